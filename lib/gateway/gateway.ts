/**
 * The gateway: the thread that holds the MQTT connection. It parses each
 * request, answers what is wrong with it at once, hands the rest to the
 * scheduler, and publishes what the workers produce. It never waits on the
 * session store or the engine itself.
 *
 * @module
 */

import type { IPublishPacket, MqttClient } from "mqtt";
import { withTimeout } from "../_util.ts";
import { logger } from "../log.ts";
import {
  type ChatRequest,
  type ControlCommand,
  encodeReply,
  parseRequest,
  type ReplyBody,
  type ReplyStyle,
  type RequestLimits,
  ServiceError,
  SESSION_ID_PATTERN,
  type Topics,
} from "../protocol/mod.ts";
import { Scheduler } from "../scheduler/scheduler.ts";
import type { SessionDirectory } from "../sessions/session_directory.ts";
import type { SessionStore } from "../sessions/session_store.ts";
import type { TurnOrder, TurnTicket } from "../sessions/turn_order.ts";
import type { EngineHealth } from "../engine/engine_health.ts";
import type { StorageHealth } from "../sessions/storage_health.ts";
import type { Stats } from "../observability/stats.ts";
import type { WorkerPool } from "../workers/worker_pool.ts";
import { estimateMessageTokens, MESSAGE_OVERHEAD_TOKENS } from "../tokens.ts";
import { type Project, turnShape } from "../projects/project_file.ts";
import { ControlTopics } from "./control_topics.ts";
import { RateLimiter } from "./rate_limiter.ts";
import { RecentRequests } from "./recent_requests.ts";
import type { SessionSigner } from "./session_signer.ts";
import { controlHint, StateTopics } from "./state_topics.ts";

/** Where and how the replies to one request go. */
export interface ReplyTarget {
  readonly project: string;
  readonly topic: string;
  readonly style: ReplyStyle;
  readonly sessionId: string;
  readonly requestId: string | undefined;
  /** MQTT 5 Correlation Data of the request, echoed on every reply. */
  readonly correlationData: Uint8Array | undefined;
  /** Replies go here instead of to the broker (a request from {@linkcode Gateway.ask}). */
  readonly deliver?: (body: ReplyBody) => void;
}

/** What the scheduler runs: a turn, or a control command in its session's order. */
type Job = TurnJob | ControlJob;

/** A request accepted into the scheduler. */
interface TurnJob {
  readonly kind: "turn";
  readonly id: number;
  readonly sessionKey: string;
  readonly priority: number;
  readonly request: ChatRequest;
  readonly target: ReplyTarget;
  readonly receivedAt: number;
  readonly dedupKey: string;
  /** Its place in the session's line across instances (a share group). */
  ticket?: TurnTicket;
  /** A game state's turn: called when it has been answered or failed (latest state wins). */
  readonly settled?: () => void;
}

/**
 * A control command for one session (clear, delete, template), run between
 * the session's turns: after those sent before it, before those sent after.
 */
interface ControlJob {
  readonly kind: "control";
  readonly sessionKey: string;
  readonly priority: number;
  readonly target: ReplyTarget;
  /** Carries the command out and answers it; never rejects. */
  readonly run: () => Promise<void>;
}

/** What the gateway is built from. */
export interface GatewayOptions {
  readonly client: MqttClient;
  readonly topics: Topics;
  readonly projects: ReadonlyMap<string, string>;
  readonly pool: WorkerPool;
  readonly directory: SessionDirectory;
  readonly stats: Stats;
  /** Gate in front of the engine: a request waits while it is down. */
  readonly engineHealth: EngineHealth;
  /**
   * Whether the session store can be written: while it cannot (a full disk),
   * turns are refused before anything is generated.
   */
  readonly storageHealth?: StorageHealth;
  /** Milliseconds a request waits for an engine that is down. */
  readonly engineWaitMs: number;
  readonly limits: RequestLimits;
  readonly qos: 0 | 1 | 2;
  readonly maxQueue: number;
  readonly maxInFlight: number;
  readonly dedupWindowMs: number;
  /** Requests per minute per session and per client id (0: off), after a burst. */
  readonly rateLimit: {
    readonly perSession: number;
    readonly perClient: number;
    readonly burst: number;
  };
  /** The session store, for the control topics; undefined turns them off. */
  readonly controlStore: SessionStore | undefined;
  /** The order of a session's turns across instances (a share group); undefined: one instance. */
  readonly turnOrder: TurnOrder | undefined;
  /** Subscribe every project's input and answer `unknown_project` for those not served. */
  readonly answerUnknownProjects: boolean;
  /** Take requests only on per-session input topics (`--session-topics-only`). */
  readonly sessionTopicsOnly: boolean;
  /** Takes only signed session ids, and hands out new ones (`--session-secret`). */
  readonly signer: SessionSigner | undefined;
  /** The engine's own count of a text's tokens, where it offers one (vLLM's `/tokenize`). */
  readonly engineTokenCount: (text: string) => Promise<number | undefined>;
  /**
   * The projects as their files declare them (state and hint topics, response
   * format, tools, model, sampling defaults); a project not here has only its prompt.
   */
  readonly projectFiles?: ReadonlyMap<string, Project>;
}

const log = logger("gateway");

/** Routes MQTT requests through the scheduler to the workers, and replies back. */
export class Gateway {
  readonly #options: GatewayOptions;
  readonly #scheduler: Scheduler<Job>;
  readonly #recent: RecentRequests;
  readonly #sessionLimit: RateLimiter;
  readonly #clientLimit: RateLimiter;
  /** Project prompts, replaceable at run time through the `template` control topic. */
  readonly #prompts: Map<string, string>;
  /**
   * Tokens of the project prompts, counted once (when set) by the engine, or
   * else estimated here, so that the workers need not load the tokenizer's
   * tables for them.
   */
  readonly #promptTokens = new Map<string, number>();
  readonly #promptsCounted: Promise<unknown>;
  readonly #control: ControlTopics | undefined;
  readonly #states: StateTopics | undefined;
  /**
   * Requests waiting for their session's earlier turns on other instances,
   * before the queue: how to give one up, and when it is queued or has failed.
   */
  readonly #inLine = new Map<
    TurnJob,
    { readonly abort: AbortController; readonly waited: Promise<void> }
  >();
  /** Topics already logged as holding a retained message (once each, bounded). */
  readonly #retainedTopics = new Set<string>();
  #subscriptions: string[] = [];
  #nextId = 1;
  #accepting = true;

  constructor(options: GatewayOptions) {
    this.#options = options;
    this.#prompts = new Map(options.projects);
    this.#promptsCounted = Promise.all(
      [...this.#prompts.values()].map((p) => this.#countPrompt(p)),
    );
    this.#recent = new RecentRequests(options.dedupWindowMs);
    const { perSession, perClient, burst } = options.rateLimit;
    this.#sessionLimit = new RateLimiter({ perMinute: perSession, burst });
    this.#clientLimit = new RateLimiter({ perMinute: perClient, burst: burst * 10 });
    this.#scheduler = new Scheduler<Job>({
      maxQueue: options.maxQueue,
      maxInFlight: options.maxInFlight,
      run: (job, signal) => this.#run(job, signal),
    });
    this.#control = options.controlStore && new ControlTopics({
      store: options.controlStore,
      directory: options.directory,
      topics: options.topics,
      publish: (target, body) => this.#publish(target, body),
      setPrompt: (project, prompt) => {
        this.#prompts.set(project, prompt);
        this.#countPrompt(prompt);
      },
      defaultPrompt: (project) => options.projects.get(project)!,
      acknowledged: (project, command, sessionId) =>
        this.#acknowledgeOnHint(project, command, sessionId),
      inOrder: (target, run) =>
        this.#submit({
          kind: "control",
          sessionKey: sessionKey(target.project, target.sessionId),
          // Cheap, and only ever behind its own session's turns.
          priority: -options.limits.maxPriority,
          target,
          run,
        }),
    });
    const files = options.projectFiles;
    this.#states = files && [...files.values()].some((project) => project.stateTopic)
      ? new StateTopics({
        topics: options.topics,
        projects: files,
        stats: options.stats,
        limits: (project) => this.#limits(project),
        sessionTopicsOnly: options.sessionTopicsOnly,
        verify: (sessionId) => options.signer?.verify(sessionId) ?? true,
        submit: (request, target, settled) => this.#takeState(request, target, settled),
        publish: (target, body) => this.#publish(target, body),
      })
      : undefined;
  }

  /** Requests waiting in the queue. */
  get queued(): number {
    return this.#scheduler.queued;
  }

  /** Requests being run. */
  get inFlight(): number {
    return this.#scheduler.inFlight;
  }

  /** Whether a session has a request queued or running. */
  isBusy(project: string, sessionId: string): boolean {
    const key = sessionKey(project, sessionId);
    return this.#scheduler.hasSession(key) ||
      [...this.#inLine.keys()].some((job) => job.sessionKey === key);
  }

  /** Subscribes to every enabled project's input (and control) topics. */
  async subscribe(): Promise<void> {
    await this.#promptsCounted;
    const { client, topics, qos } = this.#options;
    // One wildcard rather than both: overlapping filters may deliver a message twice.
    const every = this.#options.answerUnknownProjects;
    const filters: string[] = every ? [topics.input("+"), topics.sessionInput("+", "+")] : [];
    for (const project of this.#prompts.keys()) {
      if (!every) filters.push(topics.input(project), topics.sessionInput(project, "+"));
      if (this.#options.signer) filters.push(topics.newSession(project));
      if (this.#control) filters.push(...this.#control.filters(project));
      if (this.#states) filters.push(...this.#states.filters(project));
    }
    this.#subscriptions = filters.map((filter) => topics.subscription(filter));
    await client.subscribeAsync(this.#subscriptions, { qos });
    log.info("Subscribed to {filters}", { filters });
  }

  /**
   * Takes no new requests: those that still arrive are answered `cancelled`
   * with a retry hint. The subscriptions stay, so the broker queues what is
   * sent while the service is down for its next start (persistent session, QoS 1).
   */
  stopAccepting(): void {
    this.#accepting = false;
  }

  /** Handles one incoming MQTT message. Never throws. */
  handle(topic: string, payload: Uint8Array, packet: IPublishPacket): void {
    // A message the broker delivers with the retain flag was kept from some time ago and is
    // replayed at every subscription (every start): acting on it would answer a stale request,
    // or clear histories, once per start.
    if (packet.retain) {
      this.#ignoreRetained(topic);
      return;
    }
    const target = this.#options.topics.parse(topic);
    if (!target) return;
    if (target.kind === "control") {
      if (this.#prompts.has(target.project)) {
        this.#control?.handle(target, payload, this.#mqtt5Reply(packet));
      }
      return;
    }
    if (target.kind === "new_session") {
      this.#issueSession(target.project, target.nonce);
      return;
    }
    if (target.kind === "state") {
      if (this.#prompts.has(target.project)) {
        this.#states?.handle(target.project, target.sessionId, payload);
      }
      return;
    }
    this.#options.stats.request();
    const { project } = target;
    const { topics } = this.#options;
    const outcome = parseRequest(
      payload,
      project,
      topics.responseRoot(project),
      this.#limits(project),
      target.sessionId,
    );
    const mqtt5 = this.#mqtt5Reply(packet);
    if (!this.#prompts.has(project)) {
      const error = new ServiceError("unknown_project", `project "${project}" is not served here`);
      const address = outcome.ok ? outcome.request : outcome.address;
      if (address) this.#fail(this.#target(project, address, mqtt5), error);
      else this.#options.stats.unaddressable(error.code);
      return;
    }
    if (!outcome.ok) {
      const { error, address } = outcome;
      if (!address && !mqtt5) {
        this.#options.stats.unaddressable(error.code);
        log.warn("Unanswerable request on {topic}: {message}", { topic, message: error.message });
        return;
      }
      const target = this.#target(
        project,
        address ?? { sessionId: "", requestId: undefined, style: "json", replyTopic: undefined },
        mqtt5,
      );
      this.#fail(target, error);
      return;
    }
    const request = outcome.request;
    const reply = this.#target(project, { ...request }, mqtt5);
    const refusal = this.#ownership(project, target.sessionId, request.sessionId);
    if (refusal) {
      this.#fail(reply, refusal);
      return;
    }
    if (this.#refusedWhileStopping(reply)) return;
    const key = sessionKey(project, request.sessionId);

    if (request.cancel) {
      const reason = new ServiceError("cancelled", "cancelled by the client");
      const matches = request.requestId !== undefined && request.message === undefined
        ? (job: Job) => job.kind === "turn" && job.request.requestId === request.requestId
        : (job: Job) => job.kind === "turn";
      const lined = [...this.#inLine].filter(([job]) => job.sessionKey === key && matches(job));
      const found = lined.length > 0 || this.#scheduler.hasSession(key, matches);
      for (const job of this.#scheduler.cancel(key, reason, matches)) {
        this.#fail(job.target, reason, job);
      }
      for (const [, { abort }] of lined) abort.abort(reason);
      if (request.message === undefined && !request.reset) {
        if (!found) {
          const what = request.requestId === undefined
            ? `session ${request.sessionId} has no request`
            : `session ${request.sessionId} has no request ${request.requestId}`;
          this.#fail(
            reply,
            new ServiceError("not_found", `nothing to cancel: ${what} waiting or running`),
          );
        }
        return;
      }
    }

    // A copy of a request already taken: the broker's redelivery (DUP flag) or a client's
    // retry under the same request_id. A redelivered copy is dropped whatever became of the
    // first (its answer is on its way, queued for the client's session like every reply); a
    // retry is sent the first's answer again, as the client may have missed it.
    const dedupKey = request.requestId !== undefined
      ? `${key}/${request.requestId}`
      : `${key}#${payloadHash(payload)}`;
    const repeat = request.requestId !== undefined || packet.dup
      ? this.#recent.check(dedupKey)
      : this.#recent.record(dedupKey);
    if (repeat.kind !== "new") {
      this.#options.stats.ignored("duplicate");
      if (repeat.kind === "answered" && !packet.dup) this.#publish(reply, repeat.answer);
      return;
    }
    this.#admit({
      kind: "turn",
      id: this.#nextId++,
      sessionKey: key,
      priority: request.priority,
      request,
      target: reply,
      receivedAt: performance.now(),
      dedupKey,
    });
  }

  /**
   * The last admission steps of every turn, however it came (an MQTT request,
   * the operator page, a game state): the rate limits, then the session's line
   * across instances, or the queue.
   */
  #admit(job: TurnJob): void {
    const { request } = job;
    const wait = Math.max(
      this.#sessionLimit.take(job.sessionKey),
      request.clientId === undefined ? 0 : this.#clientLimit.take(request.clientId),
    );
    if (wait > 0) {
      this.#fail(
        job.target,
        // The original's words: its plain-text clients show them.
        new ServiceError("rate_limited", "Rate limit exceeded. Please slow down your requests.", {
          retryAfterMs: wait,
        }),
        job,
      );
      return;
    }
    if (this.#options.turnOrder) this.#waitInLine(job, this.#options.turnOrder);
    else this.#submit(job);
  }

  /** Refuses with a retry hint, once the service is stopping; whether it did. */
  #refusedWhileStopping(target: ReplyTarget, job?: TurnJob): boolean {
    if (this.#accepting) return false;
    const error = new ServiceError("cancelled", "the service is shutting down", {
      retryAfterMs: 5000,
    });
    this.#fail(target, error, job);
    return true;
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
    const { project } = request;
    const reply: ReplyTarget = {
      project,
      topic: "",
      style: "json",
      sessionId: request.sessionId,
      requestId: request.requestId,
      correlationData: undefined,
      deliver,
    };
    const nothing = () => {};
    if (!this.#prompts.has(project)) {
      this.#fail(reply, new ServiceError("unknown_project", `project "${project}" is not served`));
      return nothing;
    }
    if (this.#refusedWhileStopping(reply)) return nothing;
    const job = this.#inProcessTurn("ask", request, reply);
    this.#admit(job);
    return () => {
      const reason = new ServiceError("cancelled", "cancelled by the client");
      for (const queued of this.#scheduler.cancel(job.sessionKey, reason, (j) => j === job)) {
        this.#fail(queued.target, reason, queued);
      }
      this.#inLine.get(job)?.abort.abort(reason);
    };
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
      receivedAt: performance.now(),
      dedupKey: `${key}#${from}:${id}`,
      ...(settled && { settled }),
    };
  }

  /** The request limits of a project: its file's sampling defaults over the options'. */
  #limits(project: string): RequestLimits {
    const file = this.#options.projectFiles?.get(project);
    const { limits } = this.#options;
    if (file?.temperature === undefined && file?.maxTokens === undefined) return limits;
    return {
      ...limits,
      temperature: file.temperature ?? limits.temperature,
      maxTokens: file.maxTokens ?? limits.maxTokens,
    };
  }

  /**
   * Takes the turn of a game state (from {@linkcode StateTopics}): the path of
   * an MQTT request after parsing (rate limit, queue, turn order, workers,
   * store), answered as a hint; `settled` once it is answered or failed.
   */
  #takeState(request: ChatRequest, target: ReplyTarget, settled: () => void): void {
    this.#options.stats.request();
    const job = this.#inProcessTurn("state", request, target, settled);
    // A refusal settles the job like any other end (its #fail finishes the turn).
    if (this.#refusedWhileStopping(target, job)) return;
    this.#admit(job);
  }

  /** Acknowledges a session's template or clear on its hint topic, as the original did. */
  #acknowledgeOnHint(project: string, command: ControlCommand, sessionId: string): void {
    const hint = controlHint(command);
    if (!hint || !this.#options.projectFiles?.get(project)?.hintTopic) return;
    const topic = this.#options.topics.hint(project, sessionId);
    this.#options.client.publish(
      topic,
      JSON.stringify({ hint }),
      { qos: this.#options.qos },
      () => {},
    );
  }

  #submit(job: Job): void {
    try {
      this.#scheduler.submit(job);
    } catch (error) {
      this.#fail(job.target, error as ServiceError, job);
    }
  }

  /**
   * Takes the job's ticket at once, so that its place is the order it arrived
   * in, and queues it when the session's earlier turns on other instances are
   * done. Waiting jobs count against the queue's bound but hold no in-flight
   * slot: two instances waiting on each other's queued turns cannot deadlock.
   */
  #waitInLine(job: TurnJob, order: TurnOrder): void {
    if (this.#inLine.size + this.#scheduler.queued >= this.#options.maxQueue) {
      this.#submit(job); // refused with the scheduler's own queue_full
      return;
    }
    const abort = new AbortController();
    const waited = this.#takeTurn(job, order, abort.signal)
      .finally(() => this.#inLine.delete(job));
    this.#inLine.set(job, { abort, waited });
  }

  async #takeTurn(job: TurnJob, order: TurnOrder, signal: AbortSignal): Promise<void> {
    try {
      const { project, sessionId } = job.request;
      job.ticket = await order.take(project, sessionId, performance.timeOrigin + job.receivedAt);
      await job.ticket.turn(signal);
    } catch (error) {
      this.#fail(job.target, asServiceError(error), job);
      return;
    }
    this.#submit(job);
  }

  /**
   * Stops taking requests and waits up to `timeoutMs` for accepted ones to
   * finish; what is left is cancelled with an error reply. A member of a
   * share group first leaves the group, so that the broker hands new
   * requests to the other members instead of to one that refuses them.
   */
  async drain(timeoutMs: number): Promise<void> {
    const deadline = performance.now() + timeoutMs;
    if (this.#options.topics.shared && this.#subscriptions.length > 0) {
      // Requests the broker sent before it took the unsubscribe arrive before its answer, and
      // are taken. A broker that is gone does not answer: do not wait on it for long.
      await withTimeout(this.#options.client.unsubscribeAsync(this.#subscriptions), 2000)
        .catch((error) =>
          log.warn("Leaving the share group: {message}", { message: String(error) })
        );
    }
    this.stopAccepting();
    const leaving = new ServiceError("cancelled", "the service is shutting down", {
      retryAfterMs: 5000,
    });
    const lines = () => Promise.all([...this.#inLine.values()].map(({ waited }) => waited));
    const idle = (async () => {
      await lines();
      await this.#scheduler.idle();
    })();
    const outcome = await withTimeout(idle, Math.max(0, deadline - performance.now()))
      .catch(() => "timeout" as const);
    if (outcome !== "timeout") return;
    for (const { abort } of this.#inLine.values()) abort.abort(leaving);
    await lines();
    for (const job of this.#scheduler.drainQueue()) this.#fail(job.target, leaving, job);
    this.#scheduler.abortRunning(leaving);
    await this.#scheduler.idle();
  }

  /**
   * Why a request may not act on its session, if it may not: it came on the
   * shared input topic where only per-session topics are taken, or its
   * session id is not signed by this service.
   */
  #ownership(
    project: string,
    topicSessionId: string | undefined,
    sessionId: string,
  ): ServiceError | undefined {
    const { topics, sessionTopicsOnly, signer } = this.#options;
    if (topicSessionId === undefined && sessionTopicsOnly) {
      return new ServiceError(
        "forbidden",
        `requests are taken only on the session's own topic, ${
          topics.sessionInput(project, sessionId)
        }`,
      );
    }
    if (signer && !signer.verify(sessionId)) {
      return new ServiceError(
        "forbidden",
        `session id ${sessionId} is not signed by this service: ask for one on ${
          topics.newSession(project).slice(0, -1)
        }{nonce} and read it on ${topics.responseRoot(project)}{nonce}`,
      );
    }
    return undefined;
  }

  /** Hands out a new signed session id on the nonce's reply topic. */
  #issueSession(project: string, nonce: string): void {
    const { signer, topics, client, qos } = this.#options;
    if (!signer || !this.#prompts.has(project) || !SESSION_ID_PATTERN.test(nonce)) return;
    const payload = JSON.stringify({ type: "session", session_id: signer.issue() });
    client.publish(topics.response(project, nonce), payload, { qos }, () => {});
  }

  #ignoreRetained(topic: string): void {
    this.#options.stats.ignored("retained");
    if (this.#retainedTopics.has(topic) || this.#retainedTopics.size >= 1000) return;
    this.#retainedTopics.add(topic);
    log.warn(
      "Ignoring the retained message on {topic}: a retained request or command is stale, " +
        "replayed at every subscription; clear it with an empty retained message on that topic",
      { topic },
    );
  }

  async #run(job: Job, signal: AbortSignal): Promise<void> {
    if (job.kind === "control") return await job.run();
    const { request, target } = job;
    const startedAt = performance.now();
    const onAbort = () => this.#options.pool.cancel(job.id, signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    const prompt = request.systemPrompt ?? this.#prompts.get(request.project)!;
    const { engineHealth, engineWaitMs } = this.#options;
    try {
      await this.#options.directory.settled(request.project, request.sessionId);
      // A turn that cannot be saved is not generated: refused at once, the client retries.
      this.#options.storageHealth?.check();
      await engineHealth.ready(engineWaitMs, signal);
      await job.ticket?.start();
      const result = await this.#options.pool.run({
        id: job.id,
        project: request.project,
        sessionId: request.sessionId,
        requestId: request.requestId,
        message: request.message,
        ...(request.images && { images: request.images }),
        reset: request.reset,
        systemPrompt: prompt,
        systemTokens: this.#promptTokens.get(prompt),
        systemPromptFromRequest: request.systemPrompt !== undefined,
        params: request.params,
        stream: request.stream,
        ...turnShape(this.#options.projectFiles?.get(request.project), job.settled !== undefined),
      }, (seq, delta) => this.#publish(target, { type: "delta", seq, delta }));
      engineHealth.succeeded();
      const queueMs = startedAt - job.receivedAt;
      const timing = {
        queueMs,
        ttftMs: result.ttftMs === null ? null : queueMs + result.ttftMs,
        totalMs: performance.now() - job.receivedAt,
      };
      const done: ReplyBody = {
        type: "done",
        response: result.response,
        finish_reason: result.finishReason,
        usage: result.usage,
        timing: {
          queue_ms: Math.round(timing.queueMs),
          ttft_ms: timing.ttftMs === null ? null : Math.round(timing.ttftMs),
          total_ms: Math.round(timing.totalMs),
        },
        ...(result.repeated && { repeated: true }),
        ...(result.historyLost && { history_lost: true }),
      };
      this.#publish(target, done);
      // Kept for a client's retry under the same id; a copy without one is only ever dropped.
      if (request.requestId !== undefined) this.#recent.answered(job.dedupKey, done);
      this.#options.directory.touch(request.project, request.sessionId);
      // A repeat sent from history generated nothing: no engine figures to count.
      if (result.repeated) this.#options.stats.ignored("duplicate");
      else this.#options.stats.answered(request.project, timing, result.usage);
    } catch (error) {
      const failure = asServiceError(error);
      if (failure.code === "engine_unavailable") engineHealth.failed();
      if (failure.code === "storage_unavailable") this.#options.storageHealth?.failed(failure);
      this.#fail(target, failure, job);
    } finally {
      // The next turn of the session, on any instance, may start once this one is saved.
      await this.#finishTurn(job);
      signal.removeEventListener("abort", onAbort);
    }
  }

  #fail(target: ReplyTarget, error: ServiceError, job?: Job): void {
    if (job?.kind === "turn") {
      this.#recent.forget(job.dedupKey);
      this.#finishTurn(job);
    }
    this.#options.stats.error(target.project, error.code);
    if (error.code === "internal") {
      log.error("Request failed: {message}", { message: error.message });
    }
    this.#publish(target, {
      type: "error",
      error: {
        code: error.code,
        message: error.message,
        ...(error.retryAfterMs !== undefined && { retry_after_ms: error.retryAfterMs }),
      },
    });
  }

  /** Counts a project prompt's tokens; until it is counted (or if that fails) the workers count it. */
  async #countPrompt(prompt: string): Promise<void> {
    if (this.#promptTokens.has(prompt)) return;
    let tokens: number;
    try {
      const counted = await this.#options.engineTokenCount(prompt);
      tokens = counted === undefined
        ? await estimateMessageTokens(prompt)
        : counted + MESSAGE_OVERHEAD_TOKENS;
    } catch {
      return;
    }
    // Only the prompts in use are kept: one replaced through `template` is forgotten.
    const inUse = new Set(this.#prompts.values());
    for (const counted of this.#promptTokens.keys()) {
      if (!inUse.has(counted)) this.#promptTokens.delete(counted);
    }
    if (inUse.has(prompt)) this.#promptTokens.set(prompt, tokens);
  }

  /** Lets the session's next turn start, on any instance (once per job, however often called). */
  async #finishTurn(job: TurnJob): Promise<void> {
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

  #publish(target: ReplyTarget, body: ReplyBody): void {
    if (target.deliver) {
      target.deliver(body);
      return;
    }
    const payload = encodeReply(body, target.style, target.sessionId, target.requestId);
    if (payload === undefined) return;
    const properties = target.correlationData
      ? { correlationData: target.correlationData as never }
      : undefined;
    this.#options.client.publish(
      target.topic,
      payload,
      { qos: this.#options.qos, properties },
      (error) => {
        if (error) {
          log.warn("Reply to {topic} not sent: {message}", {
            topic: target.topic,
            message: error.message,
          });
        }
      },
    );
  }

  /** The MQTT 5 Response Topic and Correlation Data of a request, when it has a usable one. */
  #mqtt5Reply(
    packet: IPublishPacket,
  ): { topic: string; correlationData: Uint8Array | undefined } | undefined {
    const topic = packet.properties?.responseTopic;
    if (!topic || /[+#]/.test(topic) || topic.startsWith("$")) return undefined;
    return { topic, correlationData: packet.properties?.correlationData };
  }

  #target(
    project: string,
    address: {
      sessionId: string;
      requestId: string | undefined;
      style: ReplyStyle;
      replyTopic: string | undefined;
    },
    mqtt5: { topic: string; correlationData: Uint8Array | undefined } | undefined,
  ): ReplyTarget {
    return {
      project,
      topic: mqtt5?.topic ?? address.replyTopic ??
        this.#options.topics.response(project, address.sessionId),
      style: address.style,
      sessionId: address.sessionId,
      requestId: address.requestId,
      correlationData: mqtt5?.correlationData,
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

function sessionKey(project: string, sessionId: string): string {
  return `${project}/${sessionId}`;
}

function asServiceError(error: unknown): ServiceError {
  return error instanceof ServiceError ? error : new ServiceError("internal", String(error));
}
