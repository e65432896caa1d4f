/**
 * The gateway's side of the request workers: hands each turn to the least
 * busy worker and routes its deltas and outcome back. A worker that dies fails
 * only its own turns (`internal`) and is replaced.
 *
 * @module
 */

import { fromWire, ServiceError, toWire } from "../protocol/errors.ts";
import { sessionKey } from "../sessions/session_key.ts";
import type { FromWorker, ToWorker, TurnResult, WorkerSettings, WorkerTurn } from "./messages.ts";
import type { TurnPool } from "./turn_pool.ts";

interface Pending {
  readonly slot: Slot;
  readonly onDelta: (seq: number, text: string) => void;
  readonly resolve: (result: TurnResult) => void;
  readonly reject: (error: ServiceError) => void;
}

interface Slot {
  worker: PoolWorker;
  busy: number;
}

/** What the pool needs of a worker: a Web Worker, or a stand-in in a test. */
export interface PoolWorker {
  postMessage(message: ToWorker): void;
  onmessage: ((event: MessageEvent<FromWorker>) => void) | null;
  onerror: ((event: ErrorEvent) => void) | null;
  addEventListener(type: "message", listener: (event: MessageEvent<FromWorker>) => void): void;
  terminate(): void;
}

const WORKER_URL = new URL("./request_worker.ts", import.meta.url);

/** Starts one request worker thread. */
function spawnRequestWorker(): PoolWorker {
  return new Worker(WORKER_URL, { type: "module" });
}
/** Turns a session's own worker may run beyond the least busy one's before another takes it. */
const AFFINITY_SLACK = 8;

/** A fixed number of request workers. */
export class WorkerPool implements TurnPool {
  readonly #slots: Slot[] = [];
  readonly #pending = new Map<number, Pending>();
  readonly #settings: WorkerSettings;
  readonly #newWorker: () => PoolWorker;
  #closing = false;

  private constructor(settings: WorkerSettings, newWorker: () => PoolWorker) {
    this.#settings = settings;
    this.#newWorker = newWorker;
  }

  /**
   * Starts `size` workers and waits until each has opened the session store.
   * `newWorker` starts one (a test passes a stand-in).
   */
  static async start(
    size: number,
    settings: WorkerSettings,
    newWorker: () => PoolWorker = spawnRequestWorker,
  ): Promise<WorkerPool> {
    const pool = new WorkerPool(settings, newWorker);
    const ready: Promise<void>[] = [];
    for (let i = 0; i < size; i++) ready.push(pool.#spawn());
    await Promise.all(ready);
    return pool;
  }

  /** Runs one turn on its session's worker, as {@linkcode TurnPool.run} says. */
  async run(
    job: WorkerTurn,
    onDelta: (seq: number, text: string) => void,
    signal?: AbortSignal,
  ): Promise<TurnResult> {
    const slot = this.#pick(sessionKey(job.project, job.sessionId));
    slot.busy++;
    const { promise, resolve, reject } = Promise.withResolvers<TurnResult>();
    this.#pending.set(job.id, { slot, onDelta, resolve, reject });
    this.#send(slot, { type: "run", job });
    const onAbort = () => this.#cancel(job.id, signal!.reason);
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      return await promise;
    } finally {
      signal?.removeEventListener("abort", onAbort);
    }
  }

  /**
   * The session's own worker, which likely still holds its history (the
   * store's cache), unless it is much busier than the least busy one.
   */
  #pick(session: string): Slot {
    let least = this.#slots[0];
    for (const candidate of this.#slots) if (candidate.busy < least.busy) least = candidate;
    let hash = 0;
    for (let i = 0; i < session.length; i++) hash = (hash * 31 + session.charCodeAt(i)) | 0;
    const own = this.#slots[(hash >>> 0) % this.#slots.length];
    return own.busy - least.busy > AFFINITY_SLACK ? least : own;
  }

  /** Tells a running turn's worker to abort it; it then fails with `error`. */
  #cancel(id: number, error: ServiceError): void {
    const pending = this.#pending.get(id);
    if (pending) this.#send(pending.slot, { type: "cancel", id, reason: toWire(error) });
  }

  /** Closes the workers' stores and terminates them. Turns still running are failed. */
  async close(): Promise<void> {
    this.#closing = true;
    await Promise.all(this.#slots.map((slot) => {
      const closed = Promise.withResolvers<void>();
      const timer = setTimeout(closed.resolve, 2000);
      slot.worker.addEventListener("message", (event) => {
        if (event.data.type === "closed") {
          clearTimeout(timer);
          closed.resolve();
        }
      });
      this.#send(slot, { type: "close" });
      return closed.promise;
    }));
    for (const slot of this.#slots) slot.worker.terminate();
    for (const [id, pending] of this.#pending) {
      this.#pending.delete(id);
      pending.reject(new ServiceError("cancelled", "the service is shutting down"));
    }
  }

  #spawn(replacing?: Slot): Promise<void> {
    const worker = this.#newWorker();
    const slot: Slot = replacing ?? { worker, busy: 0 };
    slot.worker = worker;
    if (!replacing) this.#slots.push(slot);
    const ready = Promise.withResolvers<void>();
    worker.onmessage = (event) => {
      if (event.data.type === "ready") ready.resolve();
      else this.#receive(event.data);
    };
    worker.onerror = (event) => {
      event.preventDefault();
      ready.reject(new Error(`request worker failed: ${event.message}`));
      this.#crashed(slot, event.message);
    };
    this.#send(slot, { type: "init", settings: this.#settings });
    return ready.promise;
  }

  #crashed(slot: Slot, why: string): void {
    for (const [id, pending] of this.#pending) {
      if (pending.slot !== slot) continue;
      this.#pending.delete(id);
      pending.reject(new ServiceError("internal", `request worker failed: ${why}`));
    }
    slot.busy = 0;
    slot.worker.terminate();
    if (!this.#closing) this.#spawn(slot).catch(() => {});
  }

  #receive(message: FromWorker): void {
    if (message.type === "ready" || message.type === "closed") return;
    const pending = this.#pending.get(message.id);
    if (!pending) return;
    if (message.type === "delta") {
      pending.onDelta(message.seq, message.text);
      return;
    }
    this.#pending.delete(message.id);
    pending.slot.busy--;
    if (message.type === "done") {
      pending.resolve(message.result);
    } else {
      pending.reject(fromWire(message.error));
    }
  }

  #send(slot: Slot, message: ToWorker): void {
    slot.worker.postMessage(message);
  }
}
