/**
 * Reasoning models as vLLM serves them: QwQ (the default model) opens its
 * thinking block in its chat template, so what it generates is
 * `reasoning...</think> answer` with no opening tag; with a reasoning parser
 * vLLM sends the reasoning apart from the answer. Either way no reasoning
 * reaches a delta, a reply or the stored history. The simulated engine plays
 * QwQ, a real mosquitto carries the turns, the service runs as a child.
 */

import assert, { equal, match } from "node:assert/strict";
import { startSimulator } from "../lib/engine/simulator.ts";
import { mosquittoTest as test, type TestClient, withService } from "./_helpers.ts";

/** Deltas of a request joined, and its `done`. */
async function turn(client: TestClient, session: string, id: string, message: string) {
  await client.send("general/user_input", { session_id: session, message, request_id: id });
  const done = await client.final(session, id);
  const deltas = client.received
    .filter((m) =>
      m.json?.session_id === session && m.json.request_id === id && m.json.type === "delta"
    )
    .map((m) => String(m.json!.delta)).join("");
  return { done: done.json!, deltas };
}

test("vLLM: QwQ without a reasoning parser (no opening <think>) leaks no reasoning into deltas, replies or history", async () => {
  await withService({ sim: { model: "Qwen/QwQ-32B", thinking: "always" } }, async (f) => {
    const { client, sim } = f;
    const first = await turn(client, "q", "1", "hi");
    equal(first.done.type, "done", JSON.stringify(first.done));
    equal(first.done.response, '[General assistant] Turn 1: you said "hi".');
    equal(first.deltas, first.done.response);
    // The engine did reason, in the content, as QwQ does without a parser.
    const second = await turn(client, "q", "2", "and now?");
    match(String(second.done.response), /^\[General assistant\] Turn 2: you said "and now\?"\.$/);
    // The history sent with the second turn holds the first answer without its reasoning.
    const history = JSON.stringify(sim.received.at(-1)!.messages);
    assert(!history.includes("I should answer briefly"), history);
    assert(!history.includes("</think>"), history);
  });
});

test("vLLM: with --reasoning-parser the reasoning comes apart from the answer and never reaches a reply", async () => {
  const sim = await startSimulator({
    ttftMs: 0,
    itlMs: 0,
    model: "Qwen/QwQ-32B",
    thinking: "always",
    reasoningParser: "deepseek_r1",
  });
  try {
    const response = await fetch(`${sim.url}/chat/completions`, {
      method: "POST",
      body: JSON.stringify({ messages: [{ role: "user", content: "hi" }], stream: true }),
    });
    const events = (await response.text()).split("\n\n").filter((e) => e.startsWith("data: {"))
      .map((e) => JSON.parse(e.slice(6)));
    const field = (name: string) => events.map((e) => e.choices?.[0]?.delta?.[name] ?? "").join("");
    match(field("reasoning_content"), /I should answer briefly/);
    equal(field("content"), 'Turn 1: you said "hi".');
  } finally {
    await sim.close();
  }
  await withService({
    sim: { model: "Qwen/QwQ-32B", thinking: "always", reasoningParser: "deepseek_r1" },
    args: ["--reasoning-parser=deepseek_r1"],
  }, async ({ client }) => {
    const { done, deltas } = await turn(client, "p", "1", "hi");
    equal(done.response, '[General assistant] Turn 1: you said "hi".');
    equal(deltas, done.response);
  });
});
