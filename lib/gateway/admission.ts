/**
 * The admission of requests: the steps a request passes, in order, before it
 * is queued. Each goes on, with what it adds, or stops the request (a
 * `Stop`: refused with an error, sent the answer it already had, or dropped
 * and counted); one place acts on a stop (`#stop`: gives the request's memory
 * back, sends the refusal), and once the request is a turn one other place
 * refuses it (`refuse`: answers, gives its memory back, releases its session).
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
  /**
   * Called once a job has been refused or finished: gives its memory back,
   * and lets its session's next turn start.
   */
  readonly releaseSession: (job: TurnJob) => void;
}

const log = logger("gateway");

/**
 * What an admission step decides: go on, with what it adds, or stop the
 * request there ({@linkcode Stop}).
 */
type Step<T> = { readonly kind: "go"; readonly value: T } | Stop;

/**
 * A request stopped by a step: refused with an error where it can be
 * answered, sent the answer it already had (a client's retry), or dropped
 * (counted and logged by the step). `memory` is its share of the payload
 * budget, given back when it stops.
 */
type Stop =
  & (
    | { readonly kind: "refuse"; readonly target: ReplyTarget; readonly error: ServiceError }
    | { readonly kind: "repeat"; readonly target: ReplyTarget; readonly answer: ReplyBody }
    | { readonly kind: "drop" }
  )
  & { readonly memory?: Reservation };

const go = <T>(value: T): Step<T> => ({ kind: "go", value });
const refusal = (target: ReplyTarget, error: ServiceError): Stop => ({
  kind: "refuse",
  target,
  error,
});
const DROP: Stop = { kind: "drop" };

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
    if (parsed.kind !== "go") return this.#stop(parsed);
    const { request, reply, memory } = parsed.value;
    log.debug("Request {request} of {project}/{session}: parsed, on {topic}", {
      request: request.requestId ?? "-",
      project,
      session: request.sessionId,
      topic,
    });
    // Steps 3 to 6: ownership, accepting, cancel, dedup.
    const screened = this.#screen(request, reply, topicSessionId, payload, packet);
    if (screened.kind !== "go") return this.#stop({ ...screened, memory });
    const dedupKey = screened.value;
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
   * Steps 3 to 6, those between parsing and the job: each goes on or stops
   * the request. Goes on with the request's dedup key.
   */
  #screen(
    request: ChatRequest,
    reply: ReplyTarget,
    topicSessionId: string | undefined,
    payload: Uint8Array,
    packet: IPublishPacket,
  ): Step<string> {
    const { project, sessionId } = request;
    // Step 3: ownership.
    const owner = ownershipRefusal(this.#options, project, topicSessionId, sessionId);
    if (owner) return refusal(reply, owner);
    // Step 4: accepting.
    if (!this.#accepting) return refusal(reply, shuttingDown());
    // Step 5: cancel.
    if (request.cancel) {
      const cancelled = this.#cancel(request, reply);
      if (cancelled.kind !== "go") return cancelled;
    }
    // Step 6: dedup.
    return this.#dedup(request, reply, payload, packet);
  }

  /**
   * The one place a request stopped before it became a job is acted on: its
   * memory given back, its refusal or its earlier answer sent.
   */
  #stop(stop: Stop): void {
    stop.memory?.release();
    if (stop.kind === "refuse") this.refuse(stop.target, stop.error);
    else if (stop.kind === "repeat") this.#options.replies.reply(stop.target, stop.answer);
  }

  /**
   * The last steps of every turn, however it came (an MQTT request, the
   * operator page, a game state): the rate limits, then the session's line
   * across instances, or the queue.
   */
  admit(job: TurnJob): void {
    // Step 7: rate limit.
    const limited = this.#rateLimit(job);
    if (limited) return this.refuse(job.target, limited, job);
    this.#admitted.set(job.sessionKey, true);
    // Step 8: order (a share group), or step 9: queue.
    const { line, scheduler, maxQueue } = this.#options;
    // Line and queue full: straight to the scheduler, which refuses it if its queue is full.
    if (!line || line.size + scheduler.queued >= maxQueue) return this.queue(job);
    // The line resolves before its settled() does, so a drain waits for this to have acted.
    line.wait(job).then((refused) =>
      refused ? this.refuse(job.target, refused, job) : this.queue(job)
    );
  }

  /** Step 7: the rate limits a turn is over, as the refusal with the time to wait. */
  #rateLimit(job: TurnJob): ServiceError | undefined {
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
    if (wait <= 0) return undefined;
    // The original's words: its plain-text clients show them.
    return new ServiceError(
      "rate_limited",
      "Rate limit exceeded. Please slow down your requests.",
      { retryAfterMs: wait },
    );
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
      this.refuse(job.target, failure, job);
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
      this.refuse(reply, new ServiceError("unknown_project", `project "${project}" is not served`));
      return nothing;
    }
    if (!this.#accepting) {
      this.refuse(reply, shuttingDown());
      return nothing;
    }
    const job = this.#inProcessTurn("ask", request, reply);
    this.admit(job);
    return () => this.#cancelTurns(job.sessionKey, cancelledByClient(), (j) => j === job);
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
    // A refusal settles the job like any other end (its refusal releases the session).
    if (!this.#accepting) return this.refuse(target, shuttingDown(), job);
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
      ...(from === "ask" && { tryIt: true as const }),
    };
  }

  /** Cancels a session's turns that `matches` selects, waiting or running; whether any was. */
  #cancelTurns(key: string, reason: ServiceError, matches: (job: Job) => boolean): boolean {
    const { scheduler, line } = this.#options;
    const lined = line?.jobs(key, matches) ?? [];
    const found = lined.length > 0 || scheduler.hasSession(key, matches);
    for (const job of scheduler.cancel(key, reason, matches)) this.refuse(job.target, reason, job);
    for (const job of lined) line!.abort(job, reason);
    return found;
  }

  /**
   * The one place a refusal is sent: answers `error`; a turn's job is done
   * with (its session released, its memory given back) and may be retried
   * under its id.
   */
  refuse(target: ReplyTarget, error: ServiceError, job?: Job): void {
    log.debug("Request {request} of {project}/{session}: answered {code}: {message}", {
      request: target.requestId ?? "-",
      project: target.project,
      session: target.sessionId,
      code: error.code,
      message: error.message,
    });
    if (job?.kind === "turn") {
      this.#recent.forget(job.dedupKey);
      this.#options.releaseSession(job);
    }
    this.#options.replies.refuse(target, error);
  }

  /**
   * Steps 1 and 2: the project, then the payload, then the reply topic it
   * names (refused where its sender may not read, dropped where the broker
   * cannot carry it). Goes on with the request, where it is answered, and its
   * share of the memory budget.
   */
  #parse(
    topic: string,
    project: string,
    topicSessionId: string | undefined,
    payload: Uint8Array,
    packet: IPublishPacket,
  ): Step<{ request: ChatRequest; reply: ReplyTarget; memory: Reservation }> {
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
      return DROP;
    }
    const who = { project, sessionId: address.sessionId, username: topicSessionId };
    const { target, refused } = replyTarget(this.#options.replyTopics, topics, who, address, mqtt5);
    if (!outcome.ok || refused || error) {
      if (refused) stats.replyTopicRefused(project);
      // Refused here: a request's memory, if it took any, is given back at once.
      return {
        ...refusal(target, (refused ?? error)!),
        memory: outcome.ok ? outcome.memory : undefined,
      };
    }
    const { request, memory } = outcome;
    if (this.#unreachable(request, target)) return { ...DROP, memory };
    return go({ request, reply: target, memory });
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

  /**
   * Step 5: cancels what a `cancel` request names; goes on if the request
   * also carries a message or a reset.
   */
  #cancel(request: ChatRequest, reply: ReplyTarget): Step<void> {
    const key = sessionKey(request.project, request.sessionId);
    const matches = request.requestId !== undefined && request.message === undefined
      ? (job: Job) => job.kind === "turn" && job.request.requestId === request.requestId
      : (job: Job) => job.kind === "turn";
    const found = this.#cancelTurns(key, cancelledByClient(), matches);
    if (request.message !== undefined || request.reset) return go(undefined);
    if (found) return DROP;
    const what = request.requestId === undefined
      ? `session ${request.sessionId} has no request`
      : `session ${request.sessionId} has no request ${request.requestId}`;
    return refusal(
      reply,
      new ServiceError("not_found", `nothing to cancel: ${what} waiting or running`),
    );
  }

  /**
   * Step 6: a copy of a request already taken: the broker's redelivery (DUP
   * flag) or a client's retry under the same request_id. A redelivered copy is
   * dropped whatever became of the first (its answer is on its way, queued for
   * the client's session like every reply); a retry is sent the first's answer
   * again, as the client may have missed it. Goes on with the request's dedup
   * key.
   */
  #dedup(
    request: ChatRequest,
    reply: ReplyTarget,
    payload: Uint8Array,
    packet: IPublishPacket,
  ): Step<string> {
    const key = sessionKey(request.project, request.sessionId);
    const dedupKey = request.requestId !== undefined
      ? `${key}/${request.requestId}`
      : `${key}#${payloadHash(payload)}`;
    const repeat = request.requestId !== undefined || packet.dup
      ? this.#recent.check(dedupKey)
      : this.#recent.record(dedupKey);
    if (repeat.kind === "new") return go(dedupKey);
    this.#options.stats.ignored("duplicate");
    if (repeat.kind !== "answered" || packet.dup) return DROP;
    // Marked as a replay from history is: the client can tell it was not generated again.
    const { answer } = repeat;
    return {
      kind: "repeat",
      target: reply,
      answer: answer.type === "done" ? { ...answer, repeated: true } : answer,
    };
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
