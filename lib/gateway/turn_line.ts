/**
 * Turns waiting for their session's earlier turns on other instances (a share
 * group), before the queue. Each takes its ticket at once, so that its place
 * is the order it arrived in; `wait` resolves when the session's earlier turns
 * on other instances are done (the caller queues it), or with the reason it
 * could not take its place or was given up (the caller refuses it).
 *
 * @module
 */

import type { TurnOrder } from "../sessions/turn_order.ts";
import { asServiceError } from "../protocol/errors.ts";
import type { TurnJob } from "./jobs.ts";
import type { ServiceError } from "../protocol/mod.ts";

/** Options of {@linkcode TurnLine}. */
export interface TurnLineOptions {
  /** The order of a session's turns across instances. */
  readonly order: TurnOrder;
  /** The wall clock time (ms since the epoch) a job's `receivedAt` stands for. */
  readonly wallClock: (receivedAt: number) => number;
}

/** Jobs in their sessions' lines across instances. */
export class TurnLine {
  readonly #options: TurnLineOptions;
  /** How to give a waiting job up, and when it is queued or has failed. */
  readonly #waiting = new Map<
    TurnJob,
    { readonly abort: AbortController; readonly waited: Promise<ServiceError | undefined> }
  >();

  constructor(options: TurnLineOptions) {
    this.#options = options;
  }

  /** Jobs waiting. They count against the queue's bound but hold no in-flight slot. */
  get size(): number {
    return this.#waiting.size;
  }

  /** The waiting jobs of a session that `matches` selects. */
  jobs(sessionKey: string, matches: (job: TurnJob) => boolean = () => true): TurnJob[] {
    return [...this.#waiting.keys()].filter((job) => job.sessionKey === sessionKey && matches(job));
  }

  /**
   * Puts `job` in its session's line: resolves once its turn has come, or
   * with the reason it could not take its place or was given up. Two
   * instances waiting on each other's queued turns cannot deadlock, as a
   * waiting job holds no in-flight slot.
   */
  wait(job: TurnJob): Promise<ServiceError | undefined> {
    const abort = new AbortController();
    const waited = this.#take(job, abort.signal).finally(() => this.#waiting.delete(job));
    this.#waiting.set(job, { abort, waited });
    return waited;
  }

  /** Gives a waiting job up: it fails with `reason`. */
  abort(job: TurnJob, reason: ServiceError): void {
    this.#waiting.get(job)?.abort.abort(reason);
  }

  /** Gives every waiting job up. */
  abortAll(reason: ServiceError): void {
    for (const { abort } of this.#waiting.values()) abort.abort(reason);
  }

  /** Resolves once every job waiting now has its outcome, and its caller has acted on it. */
  async settled(): Promise<void> {
    await Promise.all([...this.#waiting.values()].map(({ waited }) => waited));
  }

  async #take(job: TurnJob, signal: AbortSignal): Promise<ServiceError | undefined> {
    try {
      const { project, sessionId } = job.request;
      job.ticket = await this.#options.order.take(
        project,
        sessionId,
        this.#options.wallClock(job.receivedAt),
      );
      await job.ticket.turn(signal);
    } catch (error) {
      return asServiceError(error);
    }
  }
}
