/**
 * What turns run against ({@linkcode TurnContext}), opened from the
 * {@linkcode WorkerSettings}, and how a failed turn is told to its client: the
 * same in a request worker and on the gateway's thread (`--workers 0`).
 *
 * @module
 */

import { EngineClient } from "../engine/engine_client.ts";
import { asServiceError, ServiceError } from "../protocol/errors.ts";
import { SessionStore } from "../sessions/session_store.ts";
import { asStorageError } from "../sessions/storage_health.ts";
import { WriteGenerations } from "../sessions/write_generations.ts";
import type { WorkerSettings } from "./messages.ts";

/** What a turn runs against. */
export interface TurnContext {
  readonly store: SessionStore;
  /** The first engine's client (the only one, unless several are configured). */
  readonly engine: EngineClient;
  /**
   * A client for each engine, in the fleet's order (a turn's `engine` picks one).
   * @default {[engine]}
   */
  readonly engines?: readonly EngineClient[];
  readonly maxHistoryTokens: number;
  /** Share of the budget trimming drops down to. */
  readonly trimLowWater: number;
  readonly maxModelLen: number;
  readonly skipThinking: boolean;
  /** Answers start inside a thinking block (see `RunningEngine.thinkingOpened`). */
  readonly thinkingOpened?: boolean;
  /**
   * The answer length history is budgeted for (`--max-tokens`): a request
   * asking for more keeps its history and gets what the context leaves.
   */
  readonly defaultMaxTokens?: number;
}

/**
 * Opens a session store and an engine client for turns. `store`, when given,
 * is used instead of a new one (a thread that has one open already).
 */
export async function openTurnContext(
  settings: WorkerSettings,
  store?: SessionStore,
): Promise<TurnContext> {
  const engines = (settings.endpoints ?? [settings.endpoint]).map((endpoint) =>
    new EngineClient(endpoint, {
      timeoutMs: settings.requestTimeoutMs,
      retries: settings.engineRetries,
      disableThinking: settings.skipThinking,
    })
  );
  return {
    store: store ?? await SessionStore.open(
      settings.kvPath,
      settings.sessionTtlMs,
      settings.writeGenerations && WriteGenerations.from(settings.writeGenerations),
    ),
    engine: engines[0],
    engines,
    maxHistoryTokens: settings.maxHistoryTokens,
    trimLowWater: settings.trimLowWater,
    maxModelLen: settings.maxModelLen,
    defaultMaxTokens: settings.maxTokens,
    skipThinking: settings.skipThinking,
    thinkingOpened: settings.thinkingOpened ?? false,
  };
}

/** Closes every engine client of `context`. */
export function closeEngines(context: TurnContext): void {
  for (const engine of context.engines ?? [context.engine]) engine.close();
}

/**
 * What a turn that threw `error` tells its client: the cancel's reason when
 * it was cancelled, `storage_unavailable` for a write the disk had no room
 * for, `internal` for anything unexpected. Both pools send it on as its
 * {@linkcode toWire} form, so a client cannot tell which one ran the turn.
 */
export function turnFailure(error: unknown, signal: AbortSignal): ServiceError {
  if (signal.aborted && signal.reason instanceof ServiceError) return signal.reason;
  // A write the disk had no room for: the client may retry once there is.
  return asStorageError(error) ?? asServiceError(error);
}
