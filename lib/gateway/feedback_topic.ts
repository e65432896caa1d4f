/**
 * The feedback topic of a project with an experiment,
 * `{project}/feedback/{session_id}`: a session's client rates an answer it
 * got, by its `request_id`, with a score (thumbs up/down as 1/0, or any
 * finite number of 0 or more) and/or a label (a game's outcome, "maze solved in 12 moves"):
 *
 * ```json
 * {"request_id": "r7", "score": 1, "label": "maze solved in 12 moves"}
 * ```
 *
 * The rules:
 *
 * - ownership as on the session's input topic: under `--session-secret` the
 *   session id must be one this service signed (`forbidden`); the broker's ACL
 *   lets only the session's user write its feedback topic (`deploy/mosquitto/acl`);
 * - the `request_id` must be one the session made: a user turn of its stored
 *   history carries it (`not_found` otherwise: another session's request, or
 *   one trimmed from the history);
 * - stored once, under `["feedback", project, sessionId, requestId]` with an
 *   atomic check: a repeat of the same request_id is acknowledged with
 *   `"duplicate": true` and neither stored nor counted again;
 * - acknowledged on the session's reply topic,
 *   `{"type":"feedback","session_id":"s1","request_id":"r7","accepted":true,"variant":"b"}`
 *   (the variant that answered r7, where this instance knows it; else the session's now);
 *   a bad payload is answered there with an error reply (`invalid_request`,
 *   `payload_too_large`; `overloaded` while 256 are being stored) and counted
 *   like any error;
 * - rate-limited per session as turns are (`--rate-limit` a minute after a
 *   burst of `--rate-limit-burst`), in a bucket of its own (rating does not
 *   use up a session's turns): `rate_limited` with the time to wait. A
 *   session's own rate is the bound: feedback carries no client id, and a
 *   client rotating session ids finds no request to rate in each new one
 *   (`not_found`, one history read each, at most 256 at once);
 * - at shutdown, as requests: feedback being stored is finished (the drain
 *   waits for it, {@linkcode FeedbackTopic.settled}), feedback that arrives
 *   once the service stops accepting is answered `cancelled` with a retry hint.
 *
 * @module
 */

import { logger } from "../log.ts";
import { ServiceError, SESSION_ID_PATTERN, type Topics } from "../protocol/mod.ts";
import type { SessionFeedback } from "../observability/experiment_stats.ts";
import type { Stats } from "../observability/stats.ts";
import { sessionKey } from "../sessions/session_key.ts";
import type { SessionStore } from "../sessions/session_store.ts";
import type { Experiments, FeedbackRecord } from "./experiments.ts";
import { shuttingDown } from "./jobs.ts";
import { type Ownership, ownershipRefusal } from "./ownership.ts";
import { RateLimiter } from "./rate_limiter.ts";
import type { ReplyTarget } from "./reply_target.ts";

/** The largest feedback payload taken, in bytes. */
export const MAX_FEEDBACK_BYTES = 4096;
/** The longest label taken, in characters. */
export const MAX_LABEL_CHARS = 500;
/** Feedback messages handled at once (each reads a history and writes a record); more: `overloaded`. */
const MAX_IN_FLIGHT = 256;

/** What the feedback topic acts on. */
export interface FeedbackTopicOptions extends Ownership {
  readonly topics: Topics;
  readonly experiments: Pick<Experiments, "assign" | "storeFeedback">;
  /** The sessions' stored histories, where a request_id is looked for. */
  readonly store: Pick<SessionStore, "load">;
  readonly stats: Pick<Stats, "feedback" | "error">;
  /** Sends an error reply (counted) to a target. */
  readonly refuse: (target: ReplyTarget, error: ServiceError) => void;
  /** Publishes a message that is not a reply (the acknowledgement). */
  readonly send: (topic: string, payload: string) => void;
  /**
   * The variant that answered a request, where it is known here (the experiments' outcomes).
   * @default {undefined} (the variant answering the session now)
   */
  readonly answeredBy?: (
    project: string,
    sessionId: string,
    requestId: string,
  ) => string | undefined;
  /**
   * Told of each record stored (not of a repeat): the experiments' live figures keep it.
   * @default {undefined}
   */
  readonly stored?: (project: string, feedback: SessionFeedback) => void;
  /** Feedback messages per minute per session (0: off), after a burst (`--rate-limit`). */
  readonly rateLimit: { readonly perSession: number; readonly burst: number };
  /**
   * The rate limit's clock, in milliseconds.
   * @default {performance.now}
   */
  readonly now?: () => number;
}

const log = logger("gateway");
const DECODER = new TextDecoder("utf-8", { fatal: true });
const FIELDS = ["request_id", "score", "label"];

/** Takes feedback on `{project}/feedback/{session_id}`. */
export class FeedbackTopic {
  readonly #options: FeedbackTopicOptions;
  readonly #limit: RateLimiter;
  #inFlight = 0;
  #accepting = true;
  /** Resolved when the last feedback in flight is done, while `settled` waits for it. */
  #idle: PromiseWithResolvers<void> | undefined;

  constructor(options: FeedbackTopicOptions) {
    this.#options = options;
    this.#limit = new RateLimiter({
      perMinute: options.rateLimit.perSession,
      burst: options.rateLimit.burst,
      now: options.now,
    });
  }

  /** Gives back the rate buckets of sessions that have filled up again. */
  sweep(): void {
    this.#limit.sweep();
  }

  /** Takes no new feedback (answered `cancelled`, retry later); what is in flight goes on. */
  stopAccepting(): void {
    this.#accepting = false;
  }

  /** Resolves once no feedback is being stored (the drain finishes it before the store closes). */
  settled(): Promise<void> {
    if (this.#inFlight === 0) return Promise.resolve();
    this.#idle ??= Promise.withResolvers();
    return this.#idle.promise;
  }

  /** Handles one feedback message. Never rejects. */
  async handle(project: string, sessionId: string, payload: Uint8Array): Promise<void> {
    const { topics, stats } = this.#options;
    // An id that cannot be a topic level has no reply topic: counted, not answered.
    if (!SESSION_ID_PATTERN.test(sessionId)) return stats.error(project, "invalid_request");
    const target = (requestId: string | undefined): ReplyTarget => ({
      project,
      topic: topics.response(project, sessionId),
      style: "json",
      sessionId,
      requestId,
      correlationData: undefined,
    });
    const parsed = parseFeedback(payload);
    if (!parsed.ok) return this.#options.refuse(target(parsed.requestId), parsed.error);
    const { requestId, score, label } = parsed;
    const owner = ownershipRefusal(this.#options, project, sessionId, sessionId);
    if (owner) return this.#options.refuse(target(requestId), owner);
    const wait = this.#limit.take(sessionKey(project, sessionId));
    if (wait > 0) {
      return this.#options.refuse(
        target(requestId),
        new ServiceError("rate_limited", "too much feedback from this session: slow down", {
          retryAfterMs: wait,
        }),
      );
    }
    if (!this.#accepting) return this.#options.refuse(target(requestId), shuttingDown());
    // A flood of feedback waits on the store: refused rather than held in memory.
    if (this.#inFlight >= MAX_IN_FLIGHT) {
      return this.#options.refuse(
        target(requestId),
        new ServiceError("overloaded", "too much feedback at once: try again", {
          retryAfterMs: 1000,
        }),
      );
    }
    this.#inFlight++;
    try {
      const { history } = await this.#options.store.load(project, sessionId);
      if (!history.some((m) => m.role === "user" && m.requestId === requestId)) {
        throw new ServiceError(
          "not_found",
          `session ${sessionId} made no request ${JSON.stringify(requestId)} (none in its ` +
            "stored history): feedback rates an answer the session got, by its request_id",
        );
      }
      // The variant that answered the rated request; where that is not known here, the one
      // answering the session now (the same, unless the operator stopped it or named a winner).
      const variant = this.#options.answeredBy?.(project, sessionId, requestId) ??
        (await this.#options.experiments.assign(project, sessionId))?.name;
      const record: FeedbackRecord = {
        ...(variant !== undefined && { variant }),
        ...(score !== undefined && { score }),
        ...(label !== undefined && { label }),
        at: Date.now(),
      };
      const stored = await this.#options.experiments.storeFeedback(
        project,
        sessionId,
        requestId,
        record,
      );
      if (stored) {
        stats.feedback(project, variant, score);
        this.#options.stored?.(project, { ...record, sessionId, requestId });
      }
      this.#options.send(
        topics.response(project, sessionId),
        JSON.stringify({
          type: "feedback",
          session_id: sessionId,
          request_id: requestId,
          accepted: true,
          ...(!stored && { duplicate: true }),
          ...(variant !== undefined && { variant }),
        }),
      );
    } catch (error) {
      const failure = error instanceof ServiceError ? error : new ServiceError(
        "storage_unavailable",
        `feedback not stored: ${(error as Error).message}`,
        { retryAfterMs: 1000 },
      );
      if (!(error instanceof ServiceError)) {
        log.warn("Feedback of {project}/{session} not stored: {message}", {
          project,
          session: sessionId,
          message: String(error),
        });
      }
      this.#options.refuse(target(requestId), failure);
    } finally {
      if (--this.#inFlight === 0) {
        this.#idle?.resolve();
        this.#idle = undefined;
      }
    }
  }
}

/** A feedback payload, read; or why it cannot be taken. */
type ParsedFeedback =
  | { ok: true; requestId: string; score?: number; label?: string }
  | { ok: false; error: ServiceError; requestId?: string };

/** Reads and checks a feedback payload. */
export function parseFeedback(payload: Uint8Array): ParsedFeedback {
  const fail = (message: string, requestId?: string): ParsedFeedback => ({
    ok: false,
    error: new ServiceError("invalid_request", message),
    requestId,
  });
  if (payload.length > MAX_FEEDBACK_BYTES) {
    return {
      ok: false,
      error: new ServiceError(
        "payload_too_large",
        `feedback is ${payload.length} bytes, more than the limit of ${MAX_FEEDBACK_BYTES}`,
      ),
    };
  }
  let raw: unknown;
  try {
    raw = JSON.parse(DECODER.decode(payload));
  } catch (error) {
    return fail(`feedback is ${error instanceof TypeError ? "not valid UTF-8" : "not valid JSON"}`);
  }
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
    return fail("feedback must be a JSON object with request_id and score or label");
  }
  const body = raw as Record<string, unknown>;
  const id = body.request_id;
  const requestId = typeof id === "string" && id.length >= 1 && id.length <= 256 ? id : undefined;
  if (requestId === undefined) {
    return fail("'request_id' must be the request_id (1 to 256 characters) of the answer rated");
  }
  const unknown = Object.keys(body).find((key) => !FIELDS.includes(key));
  if (unknown !== undefined) {
    return fail(`'${unknown}' is not a feedback field (fields: ${FIELDS.join(", ")})`, requestId);
  }
  const { score, label } = body;
  // Not below 0: /metrics sums scores in a counter, whose rate() takes a fall for a restart.
  if (
    score !== undefined && (typeof score !== "number" || !Number.isFinite(score) || score < 0)
  ) {
    return fail("'score' must be a finite number, 0 or more (1/0 for thumbs up/down)", requestId);
  }
  if (label !== undefined && (typeof label !== "string" || label.length > MAX_LABEL_CHARS)) {
    return fail(`'label' must be a string of at most ${MAX_LABEL_CHARS} characters`, requestId);
  }
  if (score === undefined && label === undefined) {
    return fail("feedback needs a 'score' or a 'label'", requestId);
  }
  return {
    ok: true,
    requestId,
    ...(score !== undefined && { score: score as number }),
    ...(label !== undefined && { label: label as string }),
  };
}
