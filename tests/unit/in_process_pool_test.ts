/**
 * Unit tests of the in-place pool (`--workers 0`) and of how it and a request
 * worker tell a failed turn: with a stand-in session store, and no engine
 * (a reset alone never asks it).
 */

import { deepEqual, equal, rejects } from "node:assert/strict";
import { ServiceError } from "../../lib/protocol/errors.ts";
import type { SessionStore } from "../../lib/sessions/session_store.ts";
import { InProcessPool } from "../../lib/workers/in_process_pool.ts";
import type { WorkerSettings, WorkerTurn } from "../../lib/workers/messages.ts";
import { turnFailure } from "../../lib/workers/turn_context.ts";

const SETTINGS = {
  endpoint: { baseUrl: "http://127.0.0.1:9/v1", apiKey: "none", model: "m" },
  requestTimeoutMs: 1000,
  engineRetries: 0,
  skipThinking: false,
} as WorkerSettings;

const RESET: WorkerTurn = {
  id: 1,
  project: "p",
  sessionId: "s",
  message: undefined,
  reset: true,
  systemPrompt: "",
  systemTokens: undefined,
  systemPromptFromRequest: false,
  params: { max_tokens: 16, temperature: 0, top_p: 1 },
  stream: true,
};

/** A store whose `clear` does what `clear` is given; `close` is counted. */
function fakeStore(clear: () => Promise<void>) {
  const calls = { clear: 0, close: 0 };
  const store = {
    clear: () => (calls.clear++, clear()),
    close: () => void calls.close++,
  } as unknown as SessionStore;
  return { store, calls };
}

Deno.test("InProcessPool runs a turn against the store it was given, and leaves it open", async () => {
  const { store, calls } = fakeStore(() => Promise.resolve());
  const pool = await InProcessPool.start(SETTINGS, store);
  const result = await pool.run(RESET, () => {});
  deepEqual(result, { response: "", finishReason: "reset", usage: null, ttftMs: null });
  equal(calls.clear, 1);
  await pool.close();
  equal(calls.close, 0);
});

Deno.test("InProcessPool fails a turn as a worker does: a plain error is internal, a storage one storage_unavailable", async () => {
  for (
    const [thrown, code, message] of [
      [new Error("boom"), "internal", "internal error: boom"],
      [new Error("database or disk is full"), "storage_unavailable", /the disk is full/],
    ] as const
  ) {
    const { store } = fakeStore(() => Promise.reject(thrown));
    const pool = await InProcessPool.start(SETTINGS, store);
    await rejects(pool.run(RESET, () => {}), (error: ServiceError) => {
      equal(error.constructor, ServiceError);
      equal(error.code, code);
      if (typeof message === "string") equal(error.message, message);
      else deepEqual(message.test(error.message), true, error.message);
      // Only what a worker's message carries: no cause to log twice.
      equal(error.cause, undefined);
      return true;
    });
    await pool.close();
  }
});

Deno.test("turnFailure: a cancelled turn fails with the cancel's reason, not with what it threw", () => {
  const controller = new AbortController();
  controller.abort(new ServiceError("timeout", "took too long", { retryAfterMs: 5 }));
  const failure = turnFailure(new Error("aborted"), controller.signal);
  deepEqual([failure.code, failure.message, failure.retryAfterMs], [
    "timeout",
    "took too long",
    5,
  ]);
  // Aborted without a ServiceError (not a cancel of ours): what was thrown counts.
  const other = new AbortController();
  other.abort(new Error("elsewhere"));
  equal(turnFailure(new ServiceError("queue_full", "full"), other.signal).code, "queue_full");
});
