/** Reply payloads in each style: v1 JSON, the original's plain text, a game's hint object. */

import { deepEqual, equal } from "node:assert/strict";
import { encodeReply, OVERLOADED_TEXT, type ReplyBody } from "../../lib/protocol/reply.ts";

const DELTA: ReplyBody = { type: "delta", seq: 3, delta: "Hi" };
const DONE: ReplyBody = {
  type: "done",
  response: '{"hint":"go left","move":[1,0]}',
  finish_reason: "stop",
  usage: null,
  timing: { queue_ms: 1, ttft_ms: null, total_ms: 9 },
};
const FULL: ReplyBody = {
  type: "error",
  error: { code: "queue_full", message: "the queue is full", retry_after_ms: 500 },
};
const TIMEOUT: ReplyBody = { type: "error", error: { code: "timeout", message: "too slow" } };

Deno.test("reply: v1 JSON carries the session and request ids before the body", () => {
  equal(
    encodeReply(DELTA, "json", "s", undefined),
    '{"session_id":"s","request_id":null,"type":"delta","seq":3,"delta":"Hi"}',
  );
  deepEqual(JSON.parse(encodeReply(FULL, "json", "s", "r")!), {
    session_id: "s",
    request_id: "r",
    ...FULL,
  });
});

Deno.test("reply: plain text is the answer once, or the original's error texts; no deltas", () => {
  equal(encodeReply(DELTA, "text", "s", "r"), undefined);
  equal(encodeReply(DONE, "text", "s", "r"), '{"hint":"go left","move":[1,0]}');
  equal(encodeReply(FULL, "text", "s", "r"), OVERLOADED_TEXT);
  const memory: ReplyBody = {
    type: "error",
    error: { code: "overloaded", message: "requests in flight hold ...", retry_after_ms: 1000 },
  };
  equal(encodeReply(memory, "text", "s", "r"), OVERLOADED_TEXT, "memory full is overload too");
  equal(encodeReply(TIMEOUT, "text", "s", "r"), "Error: too slow");
});

Deno.test("reply: a hint is always an object with a string hint; errors keep their code", () => {
  equal(encodeReply(DELTA, "hint", "s", "r"), undefined);
  deepEqual(JSON.parse(encodeReply(DONE, "hint", "s", "r")!), { hint: "go left", move: [1, 0] });
  deepEqual(JSON.parse(encodeReply(FULL, "hint", "s", "r")!), {
    hint: "",
    error: { code: "queue_full", message: "the queue is full", retry_after_ms: 500 },
  });
});

Deno.test("reply: an experiment's variant is named in done, errors and hints, not deltas or text", () => {
  equal(JSON.parse(encodeReply(DONE, "json", "s", "r", "b")!).variant, "b");
  equal(JSON.parse(encodeReply(FULL, "json", "s", "r", "b")!).variant, "b");
  equal("variant" in JSON.parse(encodeReply(DELTA, "json", "s", "r", "b")!), false);
  deepEqual(JSON.parse(encodeReply(DONE, "hint", "s", "r", "b")!), {
    hint: "go left",
    move: [1, 0],
    variant: "b",
  });
  equal(JSON.parse(encodeReply(TIMEOUT, "hint", "s", "r", "b")!).variant, "b");
  equal(encodeReply(DONE, "text", "s", "r", "b"), '{"hint":"go left","move":[1,0]}');
  equal(encodeReply(TIMEOUT, "text", "s", "r", "b"), "Error: too slow");
  equal("variant" in JSON.parse(encodeReply(DONE, "json", "s", "r")!), false);
});
