/**
 * The scheduler: a bounded priority queue in front of the engine.
 *
 * - Lower priority values run sooner; equal priorities run in arrival order.
 * - One request per session is in flight at a time; a session's later
 *   requests wait in order behind it without holding up other sessions.
 * - At most `maxInFlight` requests run at once (vLLM batches them all).
 * - A full queue refuses at once with a {@linkcode QueueFullError}.
 *
 * @module
 */

import { PriorityQueue } from "./priority_queue.ts";

/**
 * Thrown by {@linkcode Scheduler.submit} when the queue is full. The scheduler
 * knows no protocol: its caller says what a full queue means to a client.
 */
export class QueueFullError extends Error {
  readonly code = "queue_full";
  /** The bound that was reached: requests waiting. */
  readonly maxQueue: number;

  constructor(maxQueue: number) {
    super(`the queue is full (${maxQueue} waiting)`);
    this.name = "QueueFullError";
    this.maxQueue = maxQueue;
  }
}

/** What the scheduler needs of a request. */
export interface Schedulable {
  /** Requests with the same key run one at a time, in order. */
  readonly sessionKey: string;
  readonly priority: number;
}

/** Options of {@linkcode Scheduler}. */
export interface SchedulerOptions<T> {
  /** Requests waiting (not running) before `queue_full`. */
  readonly maxQueue: number;
  /** Requests running at once. */
  readonly maxInFlight: number;
  /** Runs one request; `signal` aborts when it is cancelled. Must not reject. */
  readonly run: (item: T, signal: AbortSignal) => Promise<void>;
}

interface Entry<T> {
  readonly item: T;
  readonly arrival: number;
}

/** Orders requests and runs them under the in-flight cap. */
export class Scheduler<T extends Schedulable> {
  readonly #options: SchedulerOptions<T>;
  /** Heads of idle sessions' queues, ready to run. */
  readonly #ready = new PriorityQueue<Entry<T>>((a, b) =>
    a.item.priority !== b.item.priority ? a.item.priority < b.item.priority : a.arrival < b.arrival
  );
  /** Every session with queued or running requests: its waiting entries in order. */
  readonly #sessions = new Map<string, Entry<T>[]>();
  readonly #running = new Map<T, AbortController>();
  /** Resolved, and replaced, each time nothing is queued or running. */
  #idle: PromiseWithResolvers<void> | undefined;
  #queued = 0;
  #arrivals = 0;

  constructor(options: SchedulerOptions<T>) {
    this.#options = options;
  }

  /** Requests waiting. */
  get queued(): number {
    return this.#queued;
  }

  /** Requests running. */
  get inFlight(): number {
    return this.#running.size;
  }

  /** Whether a session has requests queued or running (that `matches` accepts). */
  hasSession(sessionKey: string, matches?: (item: T) => boolean): boolean {
    const waiting = this.#sessions.get(sessionKey);
    if (!waiting || !matches) return waiting !== undefined;
    return waiting.some((entry) => matches(entry.item));
  }

  /** Queues `item`; throws a {@linkcode QueueFullError} when `maxQueue` wait already. */
  submit(item: T): void {
    if (this.#queued >= this.#options.maxQueue) throw new QueueFullError(this.#options.maxQueue);
    const entry = { item, arrival: this.#arrivals++ };
    this.#queued++;
    const waiting = this.#sessions.get(item.sessionKey);
    if (waiting) {
      waiting.push(entry);
    } else {
      // An idle session: its request is ready at once.
      this.#sessions.set(item.sessionKey, [entry]);
      this.#ready.push(entry);
    }
    this.#pump();
  }

  /**
   * Cancels a session's requests that `matches` selects: queued ones are
   * removed and returned; a running one is aborted with `reason`.
   */
  cancel(
    sessionKey: string,
    reason: unknown,
    matches: (item: T) => boolean = () => true,
  ): T[] {
    const waiting = this.#sessions.get(sessionKey);
    if (!waiting) return [];
    for (const [item, controller] of this.#running) {
      if (item.sessionKey === sessionKey && matches(item)) controller.abort(reason);
    }
    const removed: T[] = [];
    const head = waiting[0];
    const headRunning = this.#isRunning(head.item);
    for (let i = waiting.length - 1; i >= (headRunning ? 1 : 0); i--) {
      if (!matches(waiting[i].item)) continue;
      removed.unshift(waiting[i].item);
      waiting.splice(i, 1);
    }
    this.#queued -= removed.length;
    if (!headRunning && waiting[0] !== head) {
      this.#ready.remove((entry) => entry === head);
      if (waiting.length === 0) this.#sessions.delete(sessionKey);
      else this.#ready.push(waiting[0]);
    }
    return removed;
  }

  /** Removes and returns every queued request (at shutdown). */
  drainQueue(): T[] {
    const removed: T[] = [];
    for (const [key, waiting] of this.#sessions) {
      const start = this.#isRunning(waiting[0].item) ? 1 : 0;
      removed.push(...waiting.splice(start).map((entry) => entry.item));
      if (waiting.length === 0) this.#sessions.delete(key);
    }
    this.#ready.remove(() => true);
    this.#queued = 0;
    return removed;
  }

  /** Aborts every running request with `reason`. */
  abortRunning(reason: unknown): void {
    for (const controller of this.#running.values()) controller.abort(reason);
  }

  /** Resolves once nothing is queued or running. */
  idle(): Promise<void> {
    if (this.#sessions.size === 0) return Promise.resolve();
    this.#idle ??= Promise.withResolvers();
    return this.#idle.promise;
  }

  #isRunning(item: T): boolean {
    return this.#running.has(item);
  }

  #pump(): void {
    while (this.#running.size < this.#options.maxInFlight) {
      const entry = this.#ready.pop();
      if (!entry) break;
      this.#queued--;
      const controller = new AbortController();
      this.#running.set(entry.item, controller);
      this.#options.run(entry.item, controller.signal).finally(() => this.#finish(entry));
    }
  }

  #finish(entry: Entry<T>): void {
    this.#running.delete(entry.item);
    const key = entry.item.sessionKey;
    const waiting = this.#sessions.get(key)!;
    waiting.shift();
    if (waiting.length === 0) this.#sessions.delete(key);
    else this.#ready.push(waiting[0]);
    this.#pump();
    if (this.#sessions.size === 0) {
      this.#idle?.resolve();
      this.#idle = undefined;
    }
  }
}
