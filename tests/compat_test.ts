/**
 * The original deployment's clients keep working: camelCase requests,
 * plain-text replies, its overload text, its control topics, and no
 * reasoning of thinking models anywhere.
 */

import assert, { deepEqual, equal, match } from "node:assert/strict";
import { OVERLOADED_TEXT } from "../lib/protocol/reply.ts";
import { mosquittoTest as test, waitFor, withOriginalClient, withService } from "./_helpers.ts";

test("an original client holds a plain-text conversation with its sampling parameters", async () => {
  await withOriginalClient({ filter: "maze/assistant_response/player7" }, async (game, { sim }) => {
    const ask = async (message: string, extra: Record<string, unknown> = {}) => {
      const before = game.received.length;
      await game.send("maze/user_input", { sessionId: "player7", message, ...extra }, { qos: 0 });
      await game.next((m) => game.received.indexOf(m) >= before);
      return game.received.at(-1)!.text;
    };
    equal(
      await ask("where now?", { temperature: 0, topP: 0.5, maxTokens: 64 }),
      '[Maze guide] Turn 1: you said "where now?".',
    );
    const body = sim.received.at(-1)!;
    deepEqual([body.temperature, body.top_p, body.max_tokens], [0, 0.5, 64]);
    equal(await ask("and then?"), '[Maze guide] Turn 2: you said "and then?".');
    // Exactly one plain-text message per request: no deltas, no JSON.
    equal(game.received.length, 2);
    // A per-request system prompt replaces the project's.
    equal(
      await ask("who are you?", { systemPrompt: "You are a pirate." }),
      '[You are a pirate.] Turn 3: you said "who are you?".',
    );
    // `format: json` switches an original client to v1 replies.
    await game.send("maze/user_input", {
      sessionId: "player7",
      message: "json?",
      format: "json",
    });
    const done = await game.next((m) => m.json?.type === "done");
    equal(done.json!.response, '[Maze guide] Turn 4: you said "json?".');
  });
});

test("replyTopic is honoured at or below the session's reply topic and refused elsewhere", async () => {
  await withOriginalClient({ filter: "#" }, async (game) => {
    await game.send("maze/user_input", {
      sessionId: "p",
      message: "hi",
      replyTopic: "maze/assistant_response/p/custom",
    });
    const reply = await game.next((m) => m.topic === "maze/assistant_response/p/custom");
    match(reply.text, /Turn 1/);
    await game.send("maze/user_input", {
      sessionId: "p",
      message: "hi",
      replyTopic: "driving/assistant_response/p",
    });
    // Refused (the service would answer where the requester may not read), on the session's
    // own topic, with the reason.
    const refused = await game.next((m) => m.topic === "maze/assistant_response/p");
    match(
      refused.text,
      /^Error: reply topic "driving\/assistant_response\/p" is not one session p/,
    );
    assert(!game.received.some((m) => m.topic.startsWith("driving/")));
    // An error is plain text starting with "Error: ".
    await game.send("maze/user_input", { sessionId: "p" });
    const error = await game.next((m) =>
      m.topic === "maze/assistant_response/p" && m.text.startsWith("Error: ") && m !== refused
    );
    match(error.text, /'message' is required/);
  });
});

test("a full queue answers the original overload text", async () => {
  const args = ["--max-queue=2", "--max-in-flight=1"];
  await withOriginalClient(
    { args, sim: { ttftMs: 200 }, filter: "maze/assistant_response/#" },
    async (game) => {
      for (let i = 0; i < 10; i++) {
        await game.send("maze/user_input", { sessionId: `q${i}`, message: "hi" });
      }
      const overloaded = await game.next((m) => m.text === OVERLOADED_TEXT);
      // On the refused session's own topic, where its client listens...
      match(overloaded.topic, /^maze\/assistant_response\/q\d$/);
      // ...and each session gets one plain-text reply: its answer, or the overload text.
      const replies = (i: number) =>
        game.received.filter((m) => m.topic === `maze/assistant_response/q${i}`).map((m) => m.text);
      await waitFor(
        () => Array.from({ length: 10 }, (_, i) => replies(i).length).every((n) => n > 0),
        30_000,
        "a reply in every session",
      );
      for (let i = 0; i < 10; i++) {
        const [reply, ...more] = replies(i);
        deepEqual(more, [], `q${i} got more than one reply`);
        assert(
          reply === OVERLOADED_TEXT || reply === '[Maze guide] Turn 1: you said "hi".',
          `q${i}: ${reply}`,
        );
      }
      equal(OVERLOADED_TEXT, "Server is overloaded. Please try again in a moment.");
    },
  );
});

test("no reasoning of a thinking model reaches a delta, a reply or the history", async () => {
  // QwQ (answers open inside the thinking block), served without a reasoning parser.
  await withService(
    { sim: { thinking: "always", model: "Qwen/QwQ-32B" } },
    async ({ client, sim }) => {
      await client.send("maze/user_input", { session_id: "t", message: "think", request_id: "1" });
      const first = await client.final("t", "1");
      equal(first.json!.response, '[Maze guide] Turn 1: you said "think".');
      await client.send("maze/user_input", { session_id: "t", message: "again", request_id: "2" });
      await client.final("t", "2");
      for (const m of client.received) {
        assert(
          !/think>|I should answer briefly/.test(m.text),
          m.text,
        );
      }
      const history = sim.received.at(-1)!.messages as { role: string; content: string }[];
      for (const message of history) assert(!message.content.includes("<think>"), message.content);
      // The engine was asked not to think (Qwen3's chat template switch).
      deepEqual(sim.received.at(-1)!.chat_template_kwargs, { enable_thinking: false });
    },
  );
});

test("control topics clear history, delete sessions and replace the system prompt", async () => {
  await withOriginalClient({ filter: "maze/assistant_response/#" }, async (game) => {
    const ask = async (sessionId: string, message: string) => {
      const before = game.received.length;
      await game.send("maze/user_input", { sessionId, message });
      return (await game.next((m) =>
        game.received.indexOf(m) >= before && m.topic.endsWith(`/${sessionId}`)
      )).text;
    };
    const control = async (topic: string, payload: unknown = "") => {
      const before = game.received.length;
      await game.send(topic, payload);
      return (await game.next((m) => game.received.indexOf(m) >= before)).text;
    };
    await ask("c1", "one");
    match(await ask("c1", "two"), /Turn 2/);
    match(await control("maze/clear_history/c1"), /History cleared for session c1/);
    match(await ask("c1", "three"), /Turn 1/);
    await ask("c2", "one");
    match(
      await control("maze/delete_session", { sessionId: "all" }),
      /Deleted all 2 sessions of maze/,
    );
    match(await ask("c2", "two"), /Turn 1/);
    match(
      await control("maze/template/c1", { template: "You are Cap.", reset: true }),
      /System prompt set for session c1; history cleared/,
    );
    match(await ask("c1", "hi"), /^\[You are Cap\.\] Turn 1/);
    match(await ask("c2", "hi"), /^\[Maze guide\]/);
    match(
      await control("maze/template", { template: "Project-wide prompt." }),
      /System prompt set for project maze/,
    );
    match(await ask("c3", "hi"), /^\[Project-wide prompt\.\]/);
    match(await control("maze/template", { template: "" }), /restored/);
    match(await ask("c4", "hi"), /^\[Maze guide\]/);
  });
});
