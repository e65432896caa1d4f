/**
 * What the gateway's scheduler runs: a turn, or a control command in its
 * session's order; and the errors every path of a job may end with.
 *
 * @module
 */

import { logger } from "../log.ts";
import { type ChatRequest, ServiceError } from "../protocol/mod.ts";
import type { TurnTicket } from "../sessions/turn_order.ts";
import type { Reservation } from "./payload_budget.ts";
import type { ReplyTarget } from "./reply_target.ts";

/** What the scheduler runs: a turn, or a control command in its session's order. */
export type Job = TurnJob | ControlJob;

/** A request accepted into the scheduler. */
export interface TurnJob {
  readonly kind: "turn";
  readonly id: number;
  readonly sessionKey: string;
  readonly priority: number;
  readonly request: ChatRequest;
  /** Where its replies go; given the session's variant once that is known (the turn runner). */
  target: ReplyTarget;
  /** When it arrived, on the gateway's clock. */
  readonly receivedAt: number;
  /** Its entry in the window of recent requests. */
  readonly dedupKey: string;
  /** Its place in the session's line across instances (a share group). */
  ticket?: TurnTicket;
  /** A game state's turn: called when it has been answered or failed (latest state wins). */
  readonly settled?: () => void;
  /** An MQTT request's share of the memory budget of payloads in flight, held until it ends. */
  readonly memory?: Reservation;
  /**
   * The name of the experiment variant that answers it, set before the turn
   * runs (`experiments.ts`); undefined for a project without an experiment.
   */
  variant?: string;
  /**
   * A turn of the live page's "try it": answered by its session's variant as a player's is (the
   * operator sees what players see), but no outcome of the experiment's (the operator trying the
   * page is no player: not in the figures, the report or the guardrail).
   */
  readonly tryIt?: true;
}

/**
 * A control command for one session (clear, delete, template), run between
 * the session's turns: after those sent before it, before those sent after.
 */
export interface ControlJob {
  readonly kind: "control";
  readonly sessionKey: string;
  readonly priority: number;
  readonly target: ReplyTarget;
  /** Carries the command out and answers it; never rejects. */
  readonly run: () => Promise<void>;
}

/** The refusal of a request that arrives, or is left over, while the service stops. */
export function shuttingDown(): ServiceError {
  return new ServiceError("cancelled", "the service is shutting down", { retryAfterMs: 5000 });
}

/** The reason given to requests a client cancels. */
export function cancelledByClient(): ServiceError {
  return new ServiceError("cancelled", "cancelled by the client");
}

const log = logger("gateway");

/** Lets the session's next turn start, on any instance (once per job, however often called). */
export async function finishTurn(job: TurnJob): Promise<void> {
  job.memory?.release();
  job.settled?.();
  try {
    await job.ticket?.finish();
  } catch (error) {
    log.error("Turn of {session} not marked finished; its later turns wait: {message}", {
      session: job.sessionKey,
      message: String(error),
    });
  }
}
