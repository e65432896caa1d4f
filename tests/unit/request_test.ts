/**
 * Request parsing, the cases the end-to-end tests do not reach one by one:
 * per-session input topics, the original's form (null fields, numbers as
 * session ids, prompt templates, top-level sampling fields) and where an
 * invalid or too large payload is answered, in which style.
 */

import assert, { deepEqual, equal, match } from "node:assert/strict";
import { type ParseOutcome, parseRequest, type RequestLimits } from "../../lib/protocol/mod.ts";

/** Where replies of the project go: a `reply_topic` must lie under it. */
const ROOT = "maze/assistant_response/";
const LIMITS: RequestLimits = {
  stream: true,
  temperature: 0.7,
  topP: 0.8,
  maxTokens: 128,
  maxPriority: 5,
  maxMessageChars: 200,
  maxPayloadBytes: 800,
};

const parse = (value: unknown, topicSessionId?: string): ParseOutcome =>
  parseRequest(
    new TextEncoder().encode(typeof value === "string" ? value : JSON.stringify(value)),
    "maze",
    ROOT,
    LIMITS,
    topicSessionId,
  );

const request = (value: unknown, topicSessionId?: string) => {
  const outcome = parse(value, topicSessionId);
  assert(outcome.ok, outcome.ok ? "" : outcome.error.message);
  return outcome.request;
};

const failure = (value: unknown, topicSessionId?: string) => {
  const outcome = parse(value, topicSessionId);
  assert(!outcome.ok, "expected a refusal");
  return outcome;
};

Deno.test("request: on a session's own topic the id may be left out; another one is forbidden", () => {
  equal(request({ message: "hi" }, "s1").sessionId, "s1");
  equal(request({ session_id: "s1", message: "hi" }, "s1").sessionId, "s1");
  equal(request({ sessionId: 7, message: "hi" }, "7").sessionId, "7");
  const other = failure({ session_id: "s2", message: "hi", request_id: "r" }, "s1");
  equal(other.error.code, "forbidden");
  deepEqual(other.address, {
    sessionId: "s1",
    requestId: "r",
    style: "json",
    replyTopic: undefined,
  });
  // The refusal is written in the form the payload came in.
  equal(failure({ sessionId: "s2", message: "hi" }, "s1").address?.style, "text");
});

Deno.test("request: without a session id, a conversation of its own (default-xxxxxxxx)", () => {
  const a = request({ message: "hi" });
  const b = request({ message: "hi", session_id: "   " });
  match(a.sessionId, /^default-[0-9a-f]{8}$/);
  match(b.sessionId, /^default-[0-9a-f]{8}$/);
  assert(a.sessionId !== b.sessionId);
});

Deno.test("request: the original's form: nulls are not given, numbers and spaces around ids", () => {
  const r = request({
    sessionId: 42,
    message: "hi",
    requestId: null,
    temperature: null,
    maxTokens: 64,
    params: { top_p: null, max_tokens: 32 },
  });
  equal(r.sessionId, "42");
  equal(r.requestId, undefined);
  // `params` wins over the same field at the top level; a null in it is not given.
  deepEqual(r.params, { max_tokens: 32, temperature: 0.7, top_p: 0.8 });
  equal(request({ session_id: "  padded-id  ", message: "hi" }).sessionId, "padded-id");
});

Deno.test("request: a v1 field wins over its camelCase alias; both forms mixed are camelCase", () => {
  const r = request({ session_id: "v1", sessionId: "old", message: "hi" });
  equal(r.sessionId, "v1");
  // `sessionId` present: the original's client, whatever else it sent.
  equal(r.style, "text");
  equal(request({ session_id: "s", clientId: "c", message: "hi" }).style, "json");
  equal(request({ clientId: "c", message: "hi" }).style, "text");
  equal(request({ message: "hi" }).style, "json");
});

Deno.test("request: a prompt template is the system prompt unless one is given", () => {
  equal(request({ session_id: "s", message: "hi", prompt_template: "T" }).systemPrompt, "T");
  equal(
    request({ session_id: "s", message: "hi", prompt_template: { content: "C" } }).systemPrompt,
    "C",
  );
  equal(
    request({ session_id: "s", message: "hi", prompt_template: "T", system_prompt: "S" })
      .systemPrompt,
    "S",
  );
});

Deno.test("request: an explicit format wins; text replies never stream", () => {
  const text = request({ session_id: "s", message: "hi", format: "text", stream: true });
  deepEqual([text.style, text.stream], ["text", false]);
  const json = request({ sessionId: "s", message: "hi", format: "json" });
  deepEqual([json.style, json.stream], ["json", true]);
  equal(request({ session_id: "s", message: "hi", stream: false }).stream, false);
});

Deno.test("request: a bad id is not answered; a bad field is, on the session, in its style", () => {
  // A session id that cannot be a topic level has no topic its client may read, not even a
  // reply topic it names (which could be anyone's).
  equal(failure({ session_id: "a/b", message: "x" }).address, undefined);
  equal(
    failure({ sessionId: "a/b", message: "x", replyTopic: `${ROOT}mine`, requestId: "r" })
      .address,
    undefined,
  );
  // An invalid field after a valid id: answered on the session, in the payload's format.
  deepEqual(failure({ session_id: "s", message: 5, format: "text" }).address, {
    sessionId: "s",
    requestId: undefined,
    style: "text",
    replyTopic: undefined,
  });
});

Deno.test("request: a payload too large to parse is answered from what can be read of it", () => {
  const big = "x".repeat(LIMITS.maxPayloadBytes);
  const v1 = failure({ session_id: "s", request_id: "r", message: big });
  equal(v1.error.code, "payload_too_large");
  deepEqual(v1.address, { sessionId: "s", requestId: "r", style: "json", replyTopic: undefined });
  const original = failure({ sessionId: "t", replyTopic: `${ROOT}x`, message: big });
  deepEqual(original.address, {
    sessionId: "t",
    requestId: undefined,
    style: "text",
    replyTopic: `${ROOT}x`,
  });
  equal(failure({ sessionId: "t", format: "json", message: big }).address?.style, "json");
  // The reply topic as named: the gateway decides whether the sender may read it.
  equal(
    failure({ session_id: "s", reply_topic: "other/x", message: big }).address?.replyTopic,
    "other/x",
  );
  equal(failure({ session_id: "a/b", message: big }).address, undefined);
});

Deno.test("request: a payload nested deeper than 32 levels is refused before it is parsed", () => {
  const nested = (levels: number) =>
    `{"session_id":"s","request_id":"r","message":"hi","x":${"[".repeat(levels)}${
      "]".repeat(levels)
    }}`;
  equal(request(nested(31)).message, "hi");
  const deep = failure(nested(32));
  equal(deep.error.code, "invalid_request");
  equal(deep.error.message, "payload nests arrays and objects more than 32 levels deep");
  deepEqual(deep.address, { sessionId: "s", requestId: "r", style: "json", replyTopic: undefined });
  // Brackets inside strings are text.
  equal(request({ session_id: "s", message: "[".repeat(100) }).message, "[".repeat(100));
});

Deno.test("request: a message is needed unless reset or cancel is set, and it may not be blank", () => {
  match(failure({ session_id: "s", message: "  " }).error.message, /empty/);
  match(failure({ session_id: "s" }).error.message, /required unless/);
  const reset = request({ session_id: "s", reset: true });
  deepEqual([reset.reset, reset.message], [true, undefined]);
});

/** Tighter caps than `LIMITS`, where each is reached by the tests below. */
const TIGHT: RequestLimits = {
  maxPayloadBytes: 1024,
  maxMessageChars: 100,
  maxPriority: 10,
  maxTokens: 512,
  temperature: 0.6,
  topP: 0.9,
  stream: true,
};
const parseTight = (value: unknown) =>
  parseRequest(
    new TextEncoder().encode(typeof value === "string" ? value : JSON.stringify(value)),
    "maze",
    ROOT,
    TIGHT,
  );

Deno.test("request: v1 fields, clamping and defaults", () => {
  const outcome = parseTight({
    session_id: "s-1.a_b",
    message: "hi",
    priority: 99,
    params: { max_tokens: 9999, temperature: 0, top_k: 5, stop: "END" },
  });
  assert(outcome.ok);
  const r = outcome.request;
  equal(r.priority, 10);
  deepEqual(r.params, { max_tokens: 512, temperature: 0, top_p: 0.9, top_k: 5, stop: ["END"] });
  equal(r.style, "json");
  equal(r.stream, true);
});

Deno.test("request: the original camelCase form gets plain-text replies", () => {
  const outcome = parseTight({
    sessionId: "p",
    message: "hi",
    temperature: 0,
    topP: 0.5,
    maxTokens: 64,
    systemPrompt: "You are terse.",
    replyTopic: "maze/assistant_response/custom",
    requestId: "r",
    clientId: "game-1",
  });
  assert(outcome.ok);
  const r = outcome.request;
  deepEqual([r.sessionId, r.style, r.stream, r.requestId, r.clientId], [
    "p",
    "text",
    false,
    "r",
    "game-1",
  ]);
  deepEqual(r.params, { max_tokens: 64, temperature: 0, top_p: 0.5 });
  equal(r.systemPrompt, "You are terse.");
  equal(r.replyTopic, "maze/assistant_response/custom");
  const json = parseTight({ sessionId: "p", message: "hi", format: "json" });
  assert(json.ok && json.request.style === "json");
  // The reply topic is kept as named (the gateway decides whether its sender may read it);
  // a request that names no session is the session of the reply topic it names.
  const own = parseTight({ message: "hi", replyTopic: "maze/assistant_response/tab-1/client/r1" });
  assert(own.ok);
  deepEqual([own.request.sessionId, own.request.replyTopic], [
    "tab-1",
    "maze/assistant_response/tab-1/client/r1",
  ]);
  const elsewhere = parseTight({ message: "hi", replyTopic: "other/topic" });
  assert(elsewhere.ok);
  match(elsewhere.request.sessionId, /^default-[0-9a-f]{8}$/);
});

Deno.test("request: each bad input has its code, and an address when it names a session", () => {
  const bad = (value: unknown) => {
    const outcome = parseTight(value);
    assert(!outcome.ok);
    return [outcome.error.code, outcome.address?.sessionId];
  };
  deepEqual(bad("{oops"), ["invalid_request", undefined]);
  deepEqual(bad("[1]"), ["invalid_request", undefined]);
  deepEqual(bad({ session_id: "a/b", message: "x" }), ["invalid_request", undefined]);
  deepEqual(bad({ session_id: "a+", message: "x" }), ["invalid_request", undefined]);
  deepEqual(bad({ session_id: "a\u0000", message: "x" }), ["invalid_request", undefined]);
  deepEqual(bad({ session_id: "s" }), ["invalid_request", "s"]);
  deepEqual(bad({ session_id: "s", message: "x".repeat(101) }), ["invalid_request", "s"]);
  deepEqual(bad({ session_id: "s", message: "x", params: { logit_bias: {} } }), [
    "invalid_request",
    "s",
  ]);
  // Too large to parse whole, yet its session can be read and answered.
  deepEqual(bad({ session_id: "s", message: "x".repeat(2000) }), ["payload_too_large", "s"]);
  deepEqual(bad({ message: "x".repeat(2000), sessionId: "t" }), ["payload_too_large", "t"]);
  deepEqual(bad({ message: "x".repeat(2000) }), ["payload_too_large", undefined]);
  const invalidUtf8 = parseRequest(new Uint8Array([0x22, 0xff, 0x22]), "maze", ROOT, TIGHT);
  assert(!invalidUtf8.ok && /UTF-8/.test(invalidUtf8.error.message));
});
