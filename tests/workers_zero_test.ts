/**
 * `--workers 0`: turns run on the MQTT thread, end to end (a real mosquitto,
 * the service as a child process, the simulated engine). Clients must not be
 * able to tell: the same answers, history, cancel, errors and shutdown as with
 * the pool of Web Workers.
 */

import assert, { deepEqual } from "node:assert/strict";
import { mosquittoTest as test, withService } from "./_helpers.ts";

const IN_PLACE = ["--workers=0", "--rate-limit=0"];

test("--workers 0: an answer streams, and history is kept across turns", async () => {
  await withService({ args: IN_PLACE }, async ({ client, sim }) => {
    for (const [turn, text] of ["hi", "and then?", "thanks"].entries()) {
      const id = `r${turn + 1}`;
      await client.send("maze/user_input", { session_id: "z", message: text, request_id: id });
      const done = await client.final("z", id);
      deepEqual(done.json!.type, "done", done.text);
      deepEqual(done.json!.response, `[Maze guide] Turn ${turn + 1}: you said "${text}".`);
      const deltas = client.received.filter((m) =>
        m.json?.type === "delta" && m.json.request_id === id
      );
      assert(deltas.length >= 1);
      deepEqual(deltas.map((m) => m.json!.seq), deltas.map((_, i) => i));
      deepEqual(deltas.map((m) => m.json!.delta).join(""), done.json!.response);
      // The engine saw the earlier turns as alternating user/assistant messages.
      const messages = sim.received.at(-1)!.messages as { role: string; content: string }[];
      deepEqual(messages.length, 2 + 2 * turn);
      deepEqual(messages.at(-1)!.content, text);
    }
  });
});

test("--workers 0: cancel aborts a running turn and drops a queued one; history keeps neither", async () => {
  await withService(
    { args: IN_PLACE, sim: { ttftMs: 50, itlMs: 50, fillerTokens: 100 } },
    async ({ client, sim }) => {
      await client.send("maze/user_input", { session_id: "c", message: "slow", request_id: "run" });
      await client.send("maze/user_input", { session_id: "c", message: "q", request_id: "wait" });
      await client.next((m) => m.json?.type === "delta" && m.json.request_id === "run");
      await client.send("maze/user_input", { session_id: "c", cancel: true });
      const running = await client.final("c", "run");
      const queued = await client.final("c", "wait");
      deepEqual(running.json!.error, { code: "cancelled", message: "cancelled by the client" });
      deepEqual((queued.json!.error as { code: string }).code, "cancelled");
      const after = { session_id: "c", message: "after", request_id: "after" };
      await client.send("maze/user_input", { ...after, params: { max_tokens: 8 } });
      deepEqual((await client.final("c", "after")).json!.type, "done");
      // The engine saw the system prompt and this message only.
      deepEqual(
        (sim.received.at(-1)!.messages as { content: string }[]).map((m) => m.content).slice(1),
        ["after"],
      );
    },
  );
});

/** The error a message too long for the engine's context gets, with `args`. */
async function overflowError(args: string[]): Promise<unknown> {
  let error: unknown;
  await withService({ args, sim: { maxModelLen: 2500 } }, async ({ client }) => {
    const long = "a long message about walls and corridors ".repeat(300);
    await client.send("maze/user_input", { session_id: "e", message: long, request_id: "e1" });
    const reply = await client.final("e", "e1");
    deepEqual(reply.json!.type, "error", reply.text);
    error = reply.json!.error;
    // The session goes on.
    await client.send("maze/user_input", { session_id: "e", message: "short", request_id: "e2" });
    deepEqual((await client.final("e", "e2")).json!.type, "done");
  });
  return error;
}

test("--workers 0: a turn's error reaches the client as it does from a worker", async () => {
  const inPlace = await overflowError(IN_PLACE);
  deepEqual((inPlace as { code: string }).code, "context_overflow");
  deepEqual(inPlace, await overflowError(["--workers=1", "--rate-limit=0"]));
});

test("--workers 0: shutdown finishes or cancels every accepted turn and exits 0", async () => {
  const args = [...IN_PLACE, "--shutdown-timeout=0.5", "--max-in-flight=2"];
  await withService(
    { args, sim: { ttftMs: 20, itlMs: 40, fillerTokens: 200 } },
    async ({ client, service }) => {
      await client.subscribe("vllm-mqtt/status");
      for (let i = 0; i < 6; i++) {
        await client.send("maze/user_input", { session_id: `x${i}`, message: "long" });
      }
      await client.next((m) => m.json?.type === "delta");
      deepEqual(await service.stop("SIGTERM"), 0);
      const codes = [];
      for (let i = 0; i < 6; i++) {
        const reply = await client.final(`x${i}`, undefined, 5000);
        codes.push(
          reply.json!.type === "error" ? (reply.json!.error as { code: string }).code : "done",
        );
      }
      assert(codes.every((code) => code === "done" || code === "cancelled"), `${codes}`);
      assert(codes.includes("cancelled"), `nothing was still running at the stop: ${codes}`);
      await client.next((m) => m.topic === "vllm-mqtt/status" && m.json?.status === "offline");
    },
  );
});
