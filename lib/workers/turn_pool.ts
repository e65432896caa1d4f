/**
 * What the gateway's side needs of whatever runs turns: the pool of request
 * workers ({@linkcode WorkerPool}), or turns on the gateway's own thread
 * (`InProcessPool`, `--workers 0`). Both fail a turn with the same
 * `ServiceError`s, so a client cannot tell which one answered.
 *
 * @module
 */

import type { TurnResult, WorkerTurn } from "./messages.ts";

/** Runs turns; see {@linkcode TurnPool.run}. */
export interface TurnPool {
  /**
   * Runs one turn. Resolves with its result or rejects with a
   * `ServiceError`; `onDelta` gets the coalesced streamed text. An
   * abort of `signal` from now on cancels the turn with the signal's reason.
   */
  run(
    job: WorkerTurn,
    onDelta: (seq: number, text: string) => void,
    signal?: AbortSignal,
  ): Promise<TurnResult>;
  /** Closes what the turns run against. Turns still running are failed (`cancelled`). */
  close(): Promise<void>;
}
