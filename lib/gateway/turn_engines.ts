/**
 * How a turn gets its engine: the gateway asks for one with what it knows of
 * the turn (its session, its model or adapter, its estimated prompt), waits
 * for it to take turns, and says how the turn ended. One engine: that one,
 * waited for while it is down. Several: the router's choice
 * (`fleet_routing.ts`).
 *
 * @module
 */

import type { EngineHealth } from "../engine/engine_health.ts";

/** What the gateway knows of a turn when it chooses its engine. */
export interface TurnFacts {
  /** The session's key (`project/session id`). */
  readonly session: string;
  /**
   * The served model or adapter the turn asks for (its experiment variant's `model:`, else its
   * project's); undefined: the engine's.
   */
  readonly model: string | undefined;
  /** The system prompt's tokens, when counted. */
  readonly systemTokens: number | undefined;
  /** Estimated tokens of the new message (its text and media). */
  readonly messageTokens: number;
  /** The turn resets the session's history first. */
  readonly reset: boolean;
}

/** How a turn ended on its engine, told to whoever chose it. */
export interface EngineTurnOutcome {
  /** The turn got its answer from the engine. */
  readonly ok: boolean;
  /** The engine's count of the prompt, when it answered with usage. */
  readonly promptTokens?: number;
  /** The answer's tokens, when the engine answered with usage. */
  readonly completionTokens?: number;
  /** Milliseconds from the turn reaching its worker to its first token, when one came. */
  readonly ttftMs?: number;
}

/** An engine given to one turn. */
export interface EngineLease {
  /** The engine's index in the fleet (what the worker sends the turn to). */
  readonly index: number;
  /** Its circuit: told of failures, probed when one looks like an outage. */
  readonly health: Pick<EngineHealth, "succeeded" | "failed" | "confirmDown">;
  /** The turn's first token came: its prompt is no longer waiting there. */
  prefilled(): void;
  /** The turn is over on this engine (answered, failed, or moved to another). */
  finished(outcome: EngineTurnOutcome): void;
}

/** Gives turns their engines. */
export interface TurnEngines {
  /**
   * An engine for `turn` that takes turns now, other than those in `exclude`
   * while another serves the turn's model; waits up to `waitMs` for one to
   * come back when none does.
   *
   * @throws {ServiceError} `engine_unavailable` when none comes back in time,
   * or the reason `signal` aborts with.
   */
  acquire(
    turn: TurnFacts,
    exclude: ReadonlySet<number>,
    waitMs: number,
    signal: AbortSignal,
  ): Promise<EngineLease>;
  /**
   * The session's history was cleared, or the session deleted: what the engines hold of it is
   * no prefix of its next prompt, and its engine is chosen again (none with one engine).
   */
  forget?(session: string): Promise<void>;
}

/** The one engine of a service that has one: each turn waits for it while it is down. */
export function oneEngine(
  health: Pick<EngineHealth, "ready" | "succeeded" | "failed" | "confirmDown">,
): TurnEngines {
  const lease: EngineLease = { index: 0, health, prefilled: () => {}, finished: () => {} };
  return {
    acquire: async (_turn, _exclude, waitMs, signal) => {
      await health.ready(waitMs, signal);
      return lease;
    },
  };
}
