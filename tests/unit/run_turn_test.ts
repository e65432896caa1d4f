/**
 * One turn as a worker runs it (lib/workers/run_turn.ts), with the real
 * engine client against a scripted engine over loopback HTTP and the real
 * session store on an in-memory KV: what is sent, answered and saved when
 * the engine refuses or breaks off.
 */

import { deepEqual, equal, match, rejects } from "node:assert/strict";
import { EngineClient } from "../../lib/engine/engine_client.ts";
import { ServiceError } from "../../lib/protocol/errors.ts";
import { SessionStore } from "../../lib/sessions/session_store.ts";
import type { WorkerTurn } from "../../lib/workers/messages.ts";
import { runTurn } from "../../lib/workers/run_turn.ts";
import {
  type Answer,
  errorOf,
  FakeEngine,
  OVERFLOW_WORDINGS,
  streamedErrorOf,
  streamOf,
} from "./_fake_engine.ts";

const JOB: WorkerTurn = {
  id: 1,
  project: "p",
  sessionId: "s",
  message: "What next?",
  reset: false,
  systemPrompt: "Be brief.",
  systemTokens: undefined,
  systemPromptFromRequest: false,
  params: { max_tokens: 64, temperature: 0, top_p: 1 },
  stream: true,
};

const FORMAT = {
  type: "json_schema",
  json_schema: { name: "move", schema: { type: "object" } },
} as const;

/** A message as a turn's commit takes it. */
type StoredTurn = Parameters<SessionStore["commitTurn"]>[4][number];

/** Earlier turns of the session, as the store keeps them. */
const EARLIER = [
  { role: "user" as const, content: "first question", tokens: 5 },
  { role: "assistant" as const, content: "first answer", tokens: 5 },
  { role: "user" as const, content: "second question", tokens: 5 },
  { role: "assistant" as const, content: "second answer", tokens: 5 },
];

/**
 * Runs `job` against an engine answering `answers`, on a session holding
 * `EARLIER` then `later`; the outcome, the deltas sent, what the engine was asked and the
 * session's history afterwards.
 */
async function turn(
  answers: readonly Answer[],
  job: WorkerTurn = JOB,
  later: readonly StoredTurn[] = [],
) {
  await using engine = new FakeEngine(answers);
  const client = new EngineClient(
    { baseUrl: engine.baseUrl, apiKey: "none", model: "m" },
    { retries: 0 },
  );
  const store = new SessionStore(await Deno.openKv(":memory:"), 60_000);
  try {
    await store.commitTurn(job.project, job.sessionId, await store.load("p", "s"), 0, [
      ...EARLIER,
      ...later,
    ]);
    const deltas: string[] = [];
    const outcome = await runTurn(
      job,
      {
        store,
        engine: client,
        maxHistoryTokens: 1000,
        trimLowWater: 0.5,
        maxModelLen: 4096,
        skipThinking: false,
      },
      new AbortController().signal,
      (_seq, text) => deltas.push(text),
    ).catch((error) => error);
    const history = (await store.load(job.project, job.sessionId)).history.map((m) => m.content);
    return { outcome, deltas, asked: engine.asked, left: engine.left, history };
  } finally {
    client.close();
    store.close();
  }
}

/** The contents of the messages a request sent. */
const contents = (asked: { messages: { content: unknown }[] }) =>
  asked.messages.map((m) => m.content);

Deno.test("runTurn: the prompt is the system prompt, the history and the message; the turn is saved", async () => {
  const { outcome, deltas, asked, history } = await turn([streamOf(["Go ", "north."])]);
  equal(outcome.response, "Go north.");
  equal(outcome.finishReason, "stop");
  equal(deltas.join(""), "Go north.");
  deepEqual(contents(asked[0]), [
    "Be brief.",
    ...EARLIER.map((m) => m.content),
    "What next?",
  ]);
  deepEqual(history, [...EARLIER.map((m) => m.content), "What next?", "Go north."]);
});

Deno.test("runTurn: a context overflow, in any of vLLM's wordings, is retried once with no history, and the trim is saved", async () => {
  for (const wording of OVERFLOW_WORDINGS) {
    const { outcome, asked, history } = await turn([errorOf(400, wording), streamOf(["Fits."])]);
    equal(outcome.response, "Fits.", wording);
    equal(asked.length, 2);
    equal(asked[0].messages.length, 6);
    deepEqual(contents(asked[1]), ["Be brief.", "What next?"]);
    // The history the engine could not take is dropped for good.
    deepEqual(history, ["What next?", "Fits."]);
  }
});

Deno.test("runTurn: an overflow reported inside the stream (images counted late) is retried as one answered 400", async () => {
  const { outcome, asked, deltas } = await turn([
    streamedErrorOf(OVERFLOW_WORDINGS[1], 400),
    streamOf(["Fits."]),
  ]);
  equal(outcome.response, "Fits.");
  deepEqual(contents(asked[1]), ["Be brief.", "What next?"]);
  deepEqual(deltas, ["Fits."]);
});

Deno.test("runTurn: an overflow after the history was dropped fails the turn as context_overflow, nothing saved", async () => {
  const { outcome, asked, history } = await turn([
    errorOf(400, OVERFLOW_WORDINGS[0]),
    errorOf(400, OVERFLOW_WORDINGS[0]),
    streamOf(["never asked"]),
  ]);
  equal((outcome as ServiceError).code, "context_overflow");
  equal(asked.length, 2);
  // Nothing saved: the history is as it was.
  deepEqual(history, EARLIER.map((m) => m.content));
});

Deno.test("runTurn: a response_format the engine refuses is dropped and the turn asked again without it", async () => {
  const { outcome, asked, history } = await turn(
    [
      errorOf(400, "response_format of type json_schema is not supported by this server"),
      streamOf(['{"move":"north"}']),
    ],
    { ...JOB, responseFormat: FORMAT },
  );
  equal(outcome.response, '{"move":"north"}');
  equal(asked.length, 2);
  deepEqual(asked[0].response_format, FORMAT);
  equal(asked[1].response_format, undefined);
  equal(history.at(-1), '{"move":"north"}');
});

Deno.test("runTurn: any other refusal with a response_format fails the turn, asked once", async () => {
  const { outcome, asked } = await turn(
    [errorOf(400, "temperature must be non-negative"), streamOf(["never asked"])],
    { ...JOB, responseFormat: FORMAT },
  );
  equal((outcome as ServiceError).code, "internal");
  equal(asked.length, 1);
});

Deno.test("runTurn: a stream cut before [DONE] fails the turn, nothing saved", async () => {
  const { outcome, asked, history } = await turn([
    streamOf(["Go ", "north."], { done: false }),
    streamOf(["never asked"]),
  ]);
  equal((outcome as ServiceError).code, "engine_unavailable");
  match((outcome as ServiceError).message, /\[DONE\]/);
  equal(asked.length, 1);
  deepEqual(history, EARLIER.map((m) => m.content));
});

Deno.test("runTurn: a 4xx error event inside the stream fails the turn as the request's fault, not retried", async () => {
  const { outcome, asked, history } = await turn([
    streamedErrorOf("Invalid grammar: unsupported regex", 400, ["par"]),
    streamOf(["never asked"]),
  ]);
  equal((outcome as ServiceError).code, "internal");
  equal(asked.length, 1);
  deepEqual(history, EARLIER.map((m) => m.content));
});

Deno.test("runTurn: a 429 fails the turn with the engine's Retry-After, for the caller to wait", async () => {
  const { outcome, asked } = await turn([
    errorOf(429, "Too many requests", { "retry-after": "3" }),
    streamOf(["never asked"]),
  ]);
  await rejects(Promise.reject(outcome), (error: ServiceError) => {
    equal(error.code, "engine_unavailable");
    equal(error.retryAfterMs, 3000);
    return true;
  });
  equal(asked.length, 1);
});

Deno.test("runTurn: a request whose request_id the history holds is answered from there, the engine not asked", async () => {
  // The engine would answer anything else: only the stored answer may come back.
  const { outcome, asked, history } = await turn([streamOf(["generated again"])], {
    ...JOB,
    requestId: "r1",
  }, [
    { role: "user", content: "What next?", tokens: 5, requestId: "r1" },
    { role: "assistant", content: "Go east.", tokens: 5, finishReason: "length" },
  ]);
  deepEqual(outcome, {
    response: "Go east.",
    finishReason: "length",
    usage: null,
    ttftMs: null,
    repeated: true,
  });
  equal(asked.length, 0);
  deepEqual(history, [...EARLIER.map((m) => m.content), "What next?", "Go east."]);
});
