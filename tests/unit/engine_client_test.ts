/**
 * The engine client (lib/engine/engine_client.ts) against a scripted engine
 * over real HTTP on loopback: what each of vLLM's answers becomes.
 */

import { deepEqual, equal, match } from "node:assert/strict";
import { EngineClient, type EngineClientOptions } from "../../lib/engine/engine_client.ts";
import { ServiceError } from "../../lib/protocol/errors.ts";
import {
  type Answer,
  errorOf,
  FakeEngine,
  OVERFLOW_WORDINGS,
  streamedErrorOf,
  streamOf,
} from "./_fake_engine.ts";

const PARAMS = { max_tokens: 32, temperature: 0, top_p: 1 };
const MESSAGES = [
  { role: "system" as const, content: "Be brief." },
  { role: "user" as const, content: "Hello" },
];

/** Runs one completion against an engine answering `answers`; the texts streamed and the outcome. */
async function complete(
  answers: readonly Answer[],
  options: EngineClientOptions & { responseFormat?: unknown } = {},
) {
  await using engine = new FakeEngine(answers);
  const client = new EngineClient(
    { baseUrl: engine.baseUrl, apiKey: "none", model: "m" },
    { retries: 0, ...options },
  );
  const texts: string[] = [];
  try {
    const completion = await client.complete(
      MESSAGES,
      PARAMS,
      new AbortController().signal,
      (text) => texts.push(text),
      { responseFormat: options.responseFormat },
    ).catch((error: unknown) => error);
    return { completion, texts, asked: engine.asked, left: engine.left };
  } finally {
    client.close();
  }
}

/** `outcome` as a ServiceError (failing when it is anything else). */
function failure(outcome: unknown): ServiceError {
  if (!(outcome instanceof ServiceError)) throw new Error(`not a ServiceError: ${outcome}`);
  return outcome;
}

Deno.test("EngineClient: a whole stream is the answer, its text streamed in order", async () => {
  const { completion, texts, asked } = await complete([streamOf(["Hel", "lo", "!"])]);
  deepEqual(texts, ["Hel", "lo", "!"]);
  deepEqual(completion, { text: "Hello!", finishReason: "stop", usage: undefined });
  equal(asked.length, 1);
  deepEqual(asked[0].messages, MESSAGES);
  equal(asked[0].stream, true);
});

Deno.test("EngineClient: every vLLM wording of a prompt too long, answered 400, is context_overflow", async () => {
  for (const wording of OVERFLOW_WORDINGS) {
    const { completion, asked } = await complete([errorOf(400, wording)], { retries: 2 });
    const error = failure(completion);
    equal(error.code, "context_overflow", wording);
    match(error.message, /^400: /);
    equal(asked.length, 1, "the request's fault is never retried");
  }
});

Deno.test("EngineClient: the same wordings as an error event inside a 200 stream are context_overflow", async () => {
  for (const wording of OVERFLOW_WORDINGS) {
    const { completion, asked } = await complete([streamedErrorOf(wording, 400)], { retries: 2 });
    equal(failure(completion).code, "context_overflow", wording);
    equal(asked.length, 1);
  }
});

Deno.test("EngineClient: a 4xx error event inside a 200 stream is the request's fault: internal, not retried", async () => {
  const { completion, texts, asked } = await complete(
    [streamedErrorOf("Grammar error: unsupported JSON schema keyword 'patternProperties'", 400, [
      "{",
    ])],
    { retries: 2 },
  );
  const error = failure(completion);
  equal(error.code, "internal");
  match(error.message, /engine refused the request: 400: Grammar error/);
  deepEqual(texts, ["{"]);
  equal(asked.length, 1);
});

Deno.test("EngineClient: a 5xx error event inside a 200 stream is the engine's failure", async () => {
  const { completion } = await complete([streamedErrorOf("EngineCore encountered an issue", 500)]);
  const error = failure(completion);
  equal(error.code, "engine_unavailable");
  match(error.message, /engine stream failed: EngineCore encountered an issue/);
});

Deno.test("EngineClient: a stream that ends without [DONE] is no answer, however whole it looks", async () => {
  const { completion, texts } = await complete([streamOf(["Hi"], { done: false })]);
  const error = failure(completion);
  equal(error.code, "engine_unavailable");
  match(error.message, /\[DONE\]/);
  // What streamed was passed on; the caller discards it.
  deepEqual(texts, ["Hi"]);
});

Deno.test("EngineClient: a stream with [DONE] but no finish_reason is no answer either", async () => {
  const answer = streamOf(["Hi"]);
  // Drops the event that says why the stream ended.
  const pieces = answer.pieces.filter((piece) => !piece.includes('"finish_reason":"stop"'));
  const { completion } = await complete([{ ...answer, pieces }]);
  const error = failure(completion);
  equal(error.code, "engine_unavailable");
  match(error.message, /no finish_reason/);
});

Deno.test("EngineClient: a 429 passes on the engine's Retry-After and is not retried at once", async () => {
  const { completion, asked } = await complete(
    [errorOf(429, "Too many requests", { "retry-after": "7" }), streamOf(["late"])],
    { retries: 2 },
  );
  const error = failure(completion);
  equal(error.code, "engine_unavailable");
  equal(error.retryAfterMs, 7000);
  equal(asked.length, 1);
});

Deno.test("EngineClient: a schema refused by the engine is internal, with the engine's words", async () => {
  const format = { type: "json_schema", json_schema: { name: "a", schema: { type: "object" } } };
  const { completion, asked } = await complete(
    [errorOf(400, "response_format of type json_schema is not supported")],
    { responseFormat: format, retries: 2 },
  );
  const error = failure(completion);
  equal(error.code, "internal");
  match(error.message, /response_format of type json_schema is not supported/);
  deepEqual(asked[0].response_format, format);
  equal(asked.length, 1);
});
