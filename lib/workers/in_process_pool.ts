/**
 * Turns run on the gateway's own thread (`--workers 0`), with the same
 * interface and the same errors as the {@linkcode WorkerPool}. It saves the
 * hop between threads, which costs more CPU than the turn's own work: a
 * structured clone of each job, delta and result, and a wake-up of both
 * threads for each. What it gives up: a turn's synchronous work runs on the
 * thread that holds the MQTT connection. Session I/O and the engine's socket
 * are asynchronous; what can hold the thread is the tokenizer (its tables'
 * first load, and estimates of long texts near a session's budget) and the
 * JSON of large payloads.
 *
 * @module
 */

import { fromWire, ServiceError, toWire } from "../protocol/errors.ts";
import type { SessionStore } from "../sessions/session_store.ts";
import type { TurnResult, WorkerSettings, WorkerTurn } from "./messages.ts";
import { runTurn } from "./run_turn.ts";
import { closeEngines, openTurnContext, type TurnContext, turnFailure } from "./turn_context.ts";
import type { TurnPool } from "./turn_pool.ts";

/** Runs turns in place: one session store and one engine client for all of them. */
export class InProcessPool implements TurnPool {
  readonly #context: TurnContext;
  /** Whether the store was opened here, and is therefore closed here. */
  readonly #ownsStore: boolean;
  /** One per running turn: close() aborts them. */
  readonly #running = new Set<AbortController>();

  private constructor(context: TurnContext, ownsStore: boolean) {
    this.#context = context;
    this.#ownsStore = ownsStore;
  }

  /**
   * Opens the engine client, and a session store unless `store` is given (the
   * service's own, which its owner closes).
   */
  static async start(settings: WorkerSettings, store?: SessionStore): Promise<InProcessPool> {
    return new InProcessPool(await openTurnContext(settings, store), store === undefined);
  }

  /** Runs one turn on this thread, as {@linkcode TurnPool.run} says. */
  async run(
    job: WorkerTurn,
    onDelta: (seq: number, text: string) => void,
    signal?: AbortSignal,
  ): Promise<TurnResult> {
    // Aborted by the caller (a cancel) or by close(), whichever comes first.
    const closing = new AbortController();
    const aborted = signal ? AbortSignal.any([signal, closing.signal]) : closing.signal;
    this.#running.add(closing);
    try {
      return await runTurn(job, this.#context, aborted, onDelta);
    } catch (error) {
      // As a worker's failure arrives: what crosses the threads, without the cause.
      throw fromWire(toWire(turnFailure(error, aborted)));
    } finally {
      this.#running.delete(closing);
    }
  }

  /**
   * Fails the turns still running (`cancelled`), and closes the engine clients
   * and the store if it opened it.
   */
  close(): Promise<void> {
    const closing = new ServiceError("cancelled", "the service is shutting down");
    for (const controller of this.#running) controller.abort(closing);
    closeEngines(this.#context);
    if (this.#ownsStore) this.#context.store.close();
    return Promise.resolve();
  }
}
