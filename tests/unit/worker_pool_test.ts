/** Unit tests of the worker pool, with stand-in workers (no threads are started). */

import { deepEqual, equal, rejects } from "node:assert/strict";
import { type PoolWorker, WorkerPool } from "../../lib/workers/worker_pool.ts";
import type {
  FromWorker,
  ToWorker,
  WorkerSettings,
  WorkerTurn,
} from "../../lib/workers/messages.ts";
import { ServiceError } from "../../lib/protocol/errors.ts";

/** A worker stand-in: records what it is sent, answers what the test makes it answer. */
class FakeWorker implements PoolWorker {
  readonly received: ToWorker[] = [];
  readonly #listeners: ((event: MessageEvent<FromWorker>) => void)[] = [];
  onmessage: ((event: MessageEvent<FromWorker>) => void) | null = null;
  onerror: ((event: ErrorEvent) => void) | null = null;
  terminated = false;

  postMessage(message: ToWorker): void {
    this.received.push(message);
    if (message.type === "init") queueMicrotask(() => this.say({ type: "ready" }));
    if (message.type === "close") queueMicrotask(() => this.say({ type: "closed" }));
  }

  addEventListener(_type: "message", listener: (event: MessageEvent<FromWorker>) => void): void {
    this.#listeners.push(listener);
  }

  terminate(): void {
    this.terminated = true;
  }

  say(message: FromWorker): void {
    const event = new MessageEvent("message", { data: message });
    this.onmessage?.(event);
    for (const listener of this.#listeners) listener(event);
  }

  crash(message: string): void {
    const event = new ErrorEvent("error", { message, cancelable: true });
    this.onerror?.(event);
  }

  runs(): WorkerTurn[] {
    return this.received.flatMap((m) => m.type === "run" ? [m.job] : []);
  }
}

const SETTINGS = {} as WorkerSettings;

function job(id: number, sessionId = `s${id}`): WorkerTurn {
  return {
    id,
    project: "p",
    sessionId,
    message: "hi",
    reset: false,
    systemPrompt: "",
    systemTokens: undefined,
    systemPromptFromRequest: false,
    params: { max_tokens: 16, temperature: 0, top_p: 1 },
    stream: true,
  };
}

async function pool(size: number) {
  const workers: FakeWorker[] = [];
  const started = await WorkerPool.start(size, SETTINGS, () => {
    const worker = new FakeWorker();
    workers.push(worker);
    return worker;
  });
  return { pool: started, workers };
}

const RESULT = { response: "hello", finishReason: "stop", usage: null, ttftMs: 5 };

Deno.test("worker pool: a turn's deltas and result come back; a session keeps its worker", async () => {
  const { pool: p, workers } = await pool(2);
  equal(workers.length, 2);
  deepEqual(workers.map((w) => w.received[0].type), ["init", "init"]);
  const deltas: string[] = [];
  const first = p.run(job(1, "x"), (seq, text) => deltas.push(`${seq}:${text}`));
  const owner = workers.find((w) => w.runs().length === 1)!;
  owner.say({ type: "delta", id: 1, seq: 0, text: "hel" });
  owner.say({ type: "done", id: 1, result: RESULT });
  deepEqual(await first, RESULT);
  deepEqual(deltas, ["0:hel"]);
  const second = p.run(job(2, "x"), () => {});
  equal(owner.runs().length, 2, "the session's own worker, which holds its history");
  owner.say({ type: "error", id: 2, error: { code: "engine_unavailable", message: "down" } });
  await rejects(second, (e: ServiceError) => e.code === "engine_unavailable");
  await p.close();
});

Deno.test("worker pool: an abort cancels the turn; a crash fails only its turns", async () => {
  const { pool: p, workers } = await pool(1);
  const abort = new AbortController();
  const running = p.run(job(1), () => {}, abort.signal);
  abort.abort(new ServiceError("cancelled", "cancelled by the client"));
  deepEqual(workers[0].received.at(-1), {
    type: "cancel",
    id: 1,
    reason: { code: "cancelled", message: "cancelled by the client" },
  });
  workers[0].say({
    type: "error",
    id: 1,
    error: { code: "cancelled", message: "cancelled by the client" },
  });
  await rejects(running, (e: ServiceError) => e.code === "cancelled");

  const lost = p.run(job(2), () => {});
  workers[0].crash("boom");
  await rejects(lost, (e: ServiceError) => e.code === "internal" && /boom/.test(e.message));
  equal(workers[0].terminated, true);
  equal(workers.length, 2, "a new worker replaces the one that crashed");
  await new Promise((resolve) => setTimeout(resolve, 0));
  const next = p.run(job(3), () => {});
  deepEqual(workers[1].runs().map((j) => j.id), [3]);
  workers[1].say({ type: "done", id: 3, result: RESULT });
  deepEqual(await next, RESULT);
  await p.close();
});

Deno.test("worker pool: close fails the turns still running", async () => {
  const { pool: p, workers } = await pool(1);
  const running = p.run(job(1), () => {});
  await p.close();
  await rejects(running, (e: ServiceError) => e.code === "cancelled");
  equal(workers[0].terminated, true);
});
