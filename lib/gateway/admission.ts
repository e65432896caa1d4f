/**
 * The admission of requests: the steps a request passes, in order, before it
 * is queued, each of which may answer it with an error and stop it there.
 *
 * 1. project: a project not served here is `unknown_project`;
 * 2. parse: a payload the memory budget of payloads in flight cannot take
 *    now is `overloaded` (`payload_budget.ts`); a request that is not valid
 *    JSON or not a valid request is answered where it can be
 *    (`invalid_request`), else only counted; a reply topic its sender may not
 *    read is refused (`forbidden`, answered on the session's own reply topic);
 *    a request whose reply topic the broker cannot carry (a session id with
 *    `.` on NATS) cannot be answered: it is logged and counted;
 * 3. ownership: `forbidden` on the shared input topic under
 *    `--session-topics-only`, or for a session id this service did not sign;
 * 4. accepting: `cancelled` with a retry hint once the service is stopping;
 * 5. cancel: a `cancel` request cancels the session's waiting and running
 *    turns (`not_found` when there is none), and goes on if it also carries
 *    a message or a reset;
 * 6. dedup: a copy of a request already taken is dropped, or sent the first
 *    one's answer again;
 * 7. rate limit: `rate_limited` with the time to wait: under signed ids per
 *    project for a session not seen (new sessions per minute), then per
 *    session and per client id;
 * 8. order: in a share group, the turn waits for its session's earlier turns
 *    on other instances;
 * 9. queue: into the scheduler, or `queue_full`.
 *
 * A turn that did not come as an MQTT request (the operator page's "try
 * it", a game state) passes steps 4 and 7 to 9 only (a game state also the
 * end of step 2: a hint topic the broker cannot carry).
 *
 * @module
 */

import type { IPublishPacket } from "mqtt";
import {
  type ChatRequest,
  parseRequest,
  type ReplyAddress,
  type ReplyBody,
  type RequestLimits,
  ServiceError,
} from "../protocol/mod.ts";
import { LruMap } from "../_util.ts";
import { leftOut, logger, LogThrottle } from "../log.ts";
import { QueueFullError, type Scheduler } from "../scheduler/scheduler.ts";
import { sessionKey } from "../sessions/session_key.ts";
import type { Stats } from "../observability/stats.ts";
import { asServiceError } from "../protocol/errors.ts";
import { cancelledByClient, type Job, shuttingDown, type TurnJob } from "./jobs.ts";
import type { Prompts } from "./prompts.ts";
import { RateLimiter } from "./rate_limiter.ts";
import { RecentRequests } from "./recent_requests.ts";
import type { ReplyPublisher } from "./reply_publisher.ts";
import { mqtt5Reply, type ReplyTarget, replyTarget, type ReplyTopics } from "./reply_target.ts";
import { type Ownership, ownershipRefusal } from "./ownership.ts";
import type { TurnLine } from "./turn_line.ts";
import { PayloadBudget, type Reservation } from "./payload_budget.ts";

/** What the admission steps check against. */
export interface AdmissionOptions extends Ownership {
  readonly prompts: Prompts;
  readonly replies: ReplyPublisher;
  /** The reply topics a request may name. */
  readonly replyTopics: ReplyTopics;
  readonly stats: Stats;
  readonly scheduler: Scheduler<Job>;
  /** The sessions' lines across instances; undefined: one instance. */
  readonly line: TurnLine | undefined;
  /** Requests waiting (queued or in line) before `queue_full`. */
  readonly maxQueue: number;
  /** Bytes of heap the requests in flight may hold, parsed or waiting (0: off). */
  readonly payloadMemory: number;
  /** Milliseconds a request's copy is recognised (0: off). */
  readonly dedupWindowMs: number;
  /** Requests per minute per session and per client id (0: off), after a burst. */
  readonly rateLimit: {
    readonly perSession: number;
    readonly perClient: number;
    readonly burst: number;
    /** Sessions a project may start per minute, after a burst of as many (0: off). */
    readonly newSessions?: number;
  };
  /** Whether a session is live (has history): its next turn does not start a session. */
  readonly known: (project: string, sessionId: string) => boolean;
  /** A project's request limits. */
  readonly limits: (project: string) => RequestLimits;
  /** The gateway's clock (milliseconds). */
  readonly now: () => number;
  /** Called once a job has failed or finished: its session's next turn may start. */
  readonly finishTurn: (job: TurnJob) => void;
}

const log = logger("gateway");

/** The admission steps, and the state they keep (the dedup window, the rate limits). */
export class Admission {
  readonly #options: AdmissionOptions;
  readonly #recent: RecentRequests;
  readonly #sessionLimit: RateLimiter;
  readonly #clientLimit: RateLimiter;
  readonly #newSessions: RateLimiter;
  /** Sessions admitted lately, not yet live in the directory (their first turn runs). */
  readonly #admitted = new LruMap<string, true>(100_000);
  readonly #budget: PayloadBudget;
  /** What a client sends that cannot be served is logged, but a flood of it only once a minute. */
  readonly #unserved: LogThrottle;
  #accepting = true;
  #nextId = 1;

  constructor(options: AdmissionOptions) {
    this.#options = options;
    const { now } = options;
    this.#recent = new RecentRequests(options.dedupWindowMs, { now });
    const { perSession, perClient, burst } = options.rateLimit;
    this.#sessionLimit = new RateLimiter({ perMinute: perSession, burst, now });
    this.#clientLimit = new RateLimiter({ perMinute: perClient, burst: burst * 10, now });
    const fresh = options.rateLimit.newSessions ?? 0;
    this.#newSessions = new RateLimiter({ perMinute: fresh, burst: fresh, now });
    this.#budget = new PayloadBudget(options.payloadMemory);
    this.#unserved = new LogThrottle({ now });
  }

  /**
   * Takes one new session of `project` (a signed id issued, or the first turn
   * of a session not seen): 0 when it may start, else the milliseconds to wait.
   */
  startSession(project: string): number {
    return this.#newSessions.take(project);
  }

  /** Marks a session as started (an id just issued), so that its first turn is not a new one. */
  started(project: string, sessionId: string): void {
    this.#admitted.set(sessionKey(project, sessionId), true);
  }

  /** The window of recent requests, where a turn's answer is kept for a retry. */
  get recent(): RecentRequests {
    return this.#recent;
  }

  /** Forgets the requests and rate buckets that time has made useless, while none come. */
  sweep(): void {
    this.#recent.sweep();
    this.#sessionLimit.sweep();
    this.#clientLimit.sweep();
  }

  /** From now on, every request is refused with a retry hint (step 4). */
  stopAccepting(): void {
    this.#accepting = false;
  }

  /** Takes one MQTT request that came on a project's input topic. Never throws. */
  request(
    topic: string,
    project: string,
    topicSessionId: string | undefined,
    payload: Uint8Array,
    packet: IPublishPacket,
  ): void {
    this.#options.stats.request();
    // Steps 1 and 2: project, parse.
    const parsed = this.#parse(topic, project, topicSessionId, payload, packet);
    if (!parsed) return;
    const { request, reply, memory } = parsed;
    if (this.#unreachable(request, reply)) return memory.release();
    log.debug("Request {request} of {project}/{session}: parsed, on {topic}", {
      request: request.requestId ?? "-",
      project,
      session: request.sessionId,
      topic,
    });
    // Step 3: ownership.
    const refusal = ownershipRefusal(this.#options, project, topicSessionId, request.sessionId);
    if (refusal) {
      memory.release();
      return this.fail(reply, refusal);
    }
    // Step 4: accepting.
    if (this.refusedWhileStopping(reply)) return memory.release();
    // Step 5: cancel.
    if (request.cancel && this.#cancel(request, reply)) return memory.release();
    // Step 6: dedup.
    const dedupKey = this.#dedup(request, reply, payload, packet);
    if (dedupKey === undefined) return memory.release();
    // Steps 7 to 9: rate limit, order, queue.
    this.admit({
      kind: "turn",
      id: this.#nextId++,
      sessionKey: sessionKey(project, request.sessionId),
      priority: request.priority,
      request,
      target: reply,
      receivedAt: this.#options.now(),
      dedupKey,
      memory,
    });
  }

  /**
   * The last steps of every turn, however it came (an MQTT request, the
   * operator page, a game state): the rate limits, then the session's line
   * across instances, or the queue.
   */
  admit(job: TurnJob): void {
    const { request } = job;
    // Under signed ids, a session not seen (an id hoarded from earlier issues) draws from its
    // project's allowance of new sessions first, as issuing it did, so that rotating ids gains
    // nothing on the per-session limit. Elsewhere a session is the broker's to vouch for (the
    // ACL's per-session topics), or nothing is (the shared topic, where a relay of many users
    // and a client rotating ids look the same).
    const fresh = this.#options.signer !== undefined && !this.#admitted.get(job.sessionKey) &&
      !this.#options.known(request.project, request.sessionId);
    const wait = (fresh ? this.startSession(request.project) : 0) ||
      Math.max(
        this.#sessionLimit.take(job.sessionKey),
        request.clientId === undefined ? 0 : this.#clientLimit.take(request.clientId),
      );
    if (wait > 0) {
      // The original's words: its plain-text clients show them.
      const error = new ServiceError(
        "rate_limited",
        "Rate limit exceeded. Please slow down your requests.",
        { retryAfterMs: wait },
      );
      return this.fail(job.target, error, job);
    }
    this.#admitted.set(job.sessionKey, true);
    const { line, scheduler, maxQueue } = this.#options;
    // Line and queue full: straight to the scheduler, which refuses it if its queue is full.
    if (line && line.size + scheduler.queued < maxQueue) line.wait(job);
    else this.queue(job);
  }

  /** Queues a job in the scheduler, or answers `queue_full`. */
  queue(job: Job): void {
    try {
      this.#options.scheduler.submit(job);
      if (job.kind === "turn") {
        log.debug("Request {request} of {session}: admitted and queued ({queued} waiting)", {
          request: job.request.requestId ?? "-",
          session: job.sessionKey,
          queued: this.#options.scheduler.queued,
        });
      }
    } catch (error) {
      const failure = error instanceof QueueFullError
        ? new ServiceError("queue_full", error.message, { retryAfterMs: 1000 })
        : asServiceError(error);
      this.fail(job.target, failure, job);
    }
  }

  /**
   * Takes a request from inside the process (the operator page's "try it"):
   * after parsing, the same path as an MQTT request (rate limit, queue,
   * turn order, workers, session store), with every reply handed to `deliver`
   * instead of published. The caller chooses a session id of its own, so no
   * ownership check applies. Returns a function that cancels the request.
   */
  ask(request: ChatRequest, deliver: (body: ReplyBody) => void): () => void {
    this.#options.stats.request();
    const { project, sessionId, requestId } = request;
    const reply: ReplyTarget = {
      project,
      topic: "",
      style: "json",
      sessionId,
      requestId,
      correlationData: undefined,
      deliver,
    };
    const nothing = () => {};
    if (!this.#options.prompts.has(project)) {
      this.fail(reply, new ServiceError("unknown_project", `project "${project}" is not served`));
      return nothing;
    }
    if (this.refusedWhileStopping(reply)) return nothing;
    const job = this.#inProcessTurn("ask", request, reply);
    this.admit(job);
    return () => this.cancelTurns(job.sessionKey, cancelledByClient(), (j) => j === job);
  }

  /**
   * Takes the turn of a game state: the path of an MQTT request after parsing
   * (rate limit, queue, turn order, workers, store), answered as a hint;
   * `settled` once it is answered or failed.
   */
  takeState(request: ChatRequest, target: ReplyTarget, settled: () => void): void {
    this.#options.stats.request();
    // A hint the broker cannot carry is not worth a turn, as a request's answer is not.
    if (this.#unreachable(request, target)) return settled();
    const job = this.#inProcessTurn("state", request, target, settled);
    // A refusal settles the job like any other end (its fail finishes the turn).
    if (this.refusedWhileStopping(target, job)) return;
    this.admit(job);
  }

  /**
   * The job of a turn that did not come as an MQTT request (no request id or
   * payload to recognise a copy by: its dedup key is its own, kept apart by `from`).
   */
  #inProcessTurn(
    from: "ask" | "state",
    request: ChatRequest,
    target: ReplyTarget,
    settled?: () => void,
  ): TurnJob {
    const key = sessionKey(request.project, request.sessionId);
    const id = this.#nextId++;
    return {
      kind: "turn",
      id,
      sessionKey: key,
      priority: request.priority,
      request,
      target,
      receivedAt: this.#options.now(),
      dedupKey: `${key}#${from}:${id}`,
      ...(settled && { settled }),
    };
  }

  /** Refuses with a retry hint, once the service is stopping; whether it did. */
  refusedWhileStopping(target: ReplyTarget, job?: TurnJob): boolean {
    if (this.#accepting) return false;
    this.fail(target, shuttingDown(), job);
    return true;
  }

  /** Cancels a session's turns that `matches` selects, waiting or running; whether any was. */
  cancelTurns(key: string, reason: ServiceError, matches: (job: Job) => boolean): boolean {
    const { scheduler, line } = this.#options;
    const lined = line?.jobs(key, matches) ?? [];
    const found = lined.length > 0 || scheduler.hasSession(key, matches);
    for (const job of scheduler.cancel(key, reason, matches)) this.fail(job.target, reason, job);
    for (const job of lined) line!.abort(job, reason);
    return found;
  }

  /** Answers `error`; a turn's job is done with, and may be retried under its id. */
  fail(target: ReplyTarget, error: ServiceError, job?: Job): void {
    log.debug("Request {request} of {project}/{session}: answered {code}: {message}", {
      request: target.requestId ?? "-",
      project: target.project,
      session: target.sessionId,
      code: error.code,
      message: error.message,
    });
    if (job?.kind === "turn") {
      this.#recent.forget(job.dedupKey);
      this.#options.finishTurn(job);
    }
    this.#options.replies.fail(target, error);
  }

  /**
   * Steps 1 and 2: the project, then the payload, then the reply topic it
   * names (refused where its sender may not read). Answers what is wrong.
   */
  #parse(
    topic: string,
    project: string,
    topicSessionId: string | undefined,
    payload: Uint8Array,
    packet: IPublishPacket,
  ): { request: ChatRequest; reply: ReplyTarget; memory: Reservation } | undefined {
    const { topics, stats } = this.#options;
    const limits = this.#options.limits(project);
    const root = topics.responseRoot(project);
    const outcome = this.#budget.parse(
      payload,
      limits.maxPayloadBytes,
      (judged) => parseRequest(payload, project, root, limits, topicSessionId, judged),
    );
    const mqtt5 = mqtt5Reply(packet);
    // A payload too broken to name its session is answered on its topic's session, if any.
    const address: ReplyAddress | undefined = outcome.ok
      ? outcome.request
      : outcome.address ?? (topicSessionId === undefined ? undefined : {
        sessionId: topicSessionId,
        requestId: undefined,
        style: "json",
        replyTopic: undefined,
      });
    const served = this.#options.prompts.has(project);
    const error = !served
      ? new ServiceError("unknown_project", `project "${project}" is not served here`)
      : outcome.ok
      ? undefined
      : outcome.error;
    if (!served) {
      // A client with a mistyped project name would otherwise never be seen.
      const left = this.#unserved.take("unknown_project");
      if (left !== undefined) {
        log.warn(
          "Request on {topic} for project {project}, which is not served here ({answer}; " +
            "served: {projects}){left}",
          {
            topic,
            project,
            answer: address ? "answered unknown_project" : "not answerable",
            projects: [...this.#options.prompts.projects()],
            left: leftOut(left),
          },
        );
      }
    }
    if (!address) {
      // No session whose topics the sender may read: nowhere to answer (not even a Response
      // Topic it names, which could be anyone's).
      stats.unaddressable(error!.code);
      const left = served ? this.#unserved.take(`unanswerable ${error!.code}`) : undefined;
      if (left !== undefined) {
        log.warn("Unanswerable request on {topic}: {message}{left}", {
          topic,
          message: error!.message,
          left: leftOut(left),
        });
      }
      return undefined;
    }
    const who = { project, sessionId: address.sessionId, username: topicSessionId };
    const { target, refused } = replyTarget(this.#options.replyTopics, topics, who, address, mqtt5);
    if (!outcome.ok || refused || error) {
      // Refused here: the request's memory is given back at once.
      if (outcome.ok) outcome.memory.release();
      if (refused) stats.replyTopicRefused(project);
      this.fail(target, (refused ?? error)!);
      return undefined;
    }
    return { request: outcome.request, reply: target, memory: outcome.memory };
  }

  /**
   * End of step 2: a reply topic the broker cannot carry. Publishing there
   * would make it drop the connection, so the request is refused before it
   * costs anything; nothing can tell its client, so it is logged and counted.
   */
  #unreachable(request: ChatRequest, reply: ReplyTarget): boolean {
    const refusal = this.#options.replies.topicRefusal(reply.topic);
    if (refusal === undefined) return false;
    this.#options.stats.unaddressable("invalid_request");
    // A client's doing, like the unserved requests: a flood of it is one line a minute.
    const left = this.#unserved.take("unreachable");
    if (left === undefined) return true;
    log.warn(
      "Refused a request of session {session}: its reply topic {topic} cannot be used: " +
        "{reason}{left}",
      {
        session: request.sessionId,
        topic: reply.topic,
        reason: refusal,
        left: leftOut(left),
      },
    );
    return true;
  }

  /** Step 5: cancels what a `cancel` request names; whether the request is done with. */
  #cancel(request: ChatRequest, reply: ReplyTarget): boolean {
    const key = sessionKey(request.project, request.sessionId);
    const matches = request.requestId !== undefined && request.message === undefined
      ? (job: Job) => job.kind === "turn" && job.request.requestId === request.requestId
      : (job: Job) => job.kind === "turn";
    const found = this.cancelTurns(key, cancelledByClient(), matches);
    if (request.message !== undefined || request.reset) return false;
    if (!found) {
      const what = request.requestId === undefined
        ? `session ${request.sessionId} has no request`
        : `session ${request.sessionId} has no request ${request.requestId}`;
      this.fail(
        reply,
        new ServiceError("not_found", `nothing to cancel: ${what} waiting or running`),
      );
    }
    return true;
  }

  /**
   * Step 6: a copy of a request already taken: the broker's redelivery (DUP
   * flag) or a client's retry under the same request_id. A redelivered copy is
   * dropped whatever became of the first (its answer is on its way, queued for
   * the client's session like every reply); a retry is sent the first's answer
   * again, as the client may have missed it. Returns the request's dedup key,
   * or undefined for a copy.
   */
  #dedup(
    request: ChatRequest,
    reply: ReplyTarget,
    payload: Uint8Array,
    packet: IPublishPacket,
  ): string | undefined {
    const key = sessionKey(request.project, request.sessionId);
    const dedupKey = request.requestId !== undefined
      ? `${key}/${request.requestId}`
      : `${key}#${payloadHash(payload)}`;
    const repeat = request.requestId !== undefined || packet.dup
      ? this.#recent.check(dedupKey)
      : this.#recent.record(dedupKey);
    if (repeat.kind === "new") return dedupKey;
    this.#options.stats.ignored("duplicate");
    if (repeat.kind === "answered" && !packet.dup) {
      // Marked as a replay from history is: the client can tell it was not generated again.
      const { answer } = repeat;
      this.#options.replies.reply(
        reply,
        answer.type === "done" ? { ...answer, repeated: true } : answer,
      );
    }
    return undefined;
  }
}

/** FNV-1a over the payload: a copy of a request without a `request_id` has the same bytes. */
function payloadHash(payload: Uint8Array): string {
  let hash = 0x811c9dc5;
  for (let i = 0; i < payload.length; i++) {
    hash ^= payload[i];
    hash = Math.imul(hash, 0x01000193);
  }
  return `${(hash >>> 0).toString(36)}:${payload.length}`;
}
