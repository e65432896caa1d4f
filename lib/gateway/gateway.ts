/**
 * The gateway: the thread that holds the MQTT connection. It routes each
 * message by its topic, takes requests through the admission steps (see
 * `admission.ts`), runs what is admitted in the scheduler's order, and
 * publishes what the workers produce. It knows the broker only as functions
 * (`publish`, `subscribe`, `unsubscribe`) and the workers as a `TurnPool`:
 * an admitted turn goes from the scheduler to the pool's `run` (see
 * `turn_runner.ts`), and its deltas and answer come back here to be published.
 *
 * @module
 */

import type { IPublishPacket } from "mqtt";
import { withTimeout } from "../_util.ts";
import { logger } from "../log.ts";
import {
  type ChatRequest,
  CONTROL_COMMANDS,
  type ControlCommand,
  type ReplyBody,
  ServiceError,
  SESSION_ID_PATTERN,
  topicMatches,
} from "../protocol/mod.ts";
import { Scheduler } from "../scheduler/scheduler.ts";
import { sessionKey } from "../sessions/session_key.ts";
import { Admission } from "./admission.ts";
import { ControlTopics } from "./control_topics.ts";
import { oneEngine } from "./turn_engines.ts";
import { asServiceError } from "../protocol/errors.ts";
import { finishTurn, type Job, shuttingDown } from "./jobs.ts";
import { Prompts } from "./prompts.ts";
import { ReplyPublisher } from "./reply_publisher.ts";
import { mqtt5Reply, type ReplyTarget, ReplyTopics } from "./reply_target.ts";
import { controlHint, StateTopics } from "./state_topics.ts";
import { FeedbackTopic } from "./feedback_topic.ts";
import { TurnLine } from "./turn_line.ts";
import { runTurnJob, type TurnRunnerOptions } from "./turn_runner.ts";
import { type GatewayOptions, projectLimits } from "./gateway_options.ts";

export type { GatewayOptions } from "./gateway_options.ts";
export type { ReplyTarget } from "./reply_target.ts";

const log = logger("gateway");

/** Routes MQTT requests through the scheduler to the workers, and replies back. */
export class Gateway {
  readonly #options: GatewayOptions;
  readonly #now: () => number;
  readonly #scheduler: Scheduler<Job>;
  readonly #prompts: Prompts;
  readonly #replies: ReplyPublisher;
  readonly #replyTopics: ReplyTopics;
  readonly #admission: Admission;
  readonly #line: TurnLine | undefined;
  readonly #turns: TurnRunnerOptions;
  readonly #control: ControlTopics | undefined;
  readonly #states: StateTopics | undefined;
  readonly #feedback: FeedbackTopic | undefined;
  /** Topics already logged as holding a retained message (once each, bounded). */
  readonly #retainedTopics = new Set<string>();
  #subscriptions: string[];

  constructor(options: GatewayOptions) {
    this.#options = options;
    const now = this.#now = options.now ?? (() => performance.now());
    const { topics, stats, turnOrder } = options;
    // The variants' own prompts are counted too: the workers and the router get their tokens.
    const variantPrompts = [...options.projectFiles?.values() ?? []]
      .flatMap((project) => project.experiment?.variants ?? [])
      .flatMap((variant) => variant.prompt ?? []);
    this.#prompts = new Prompts(options.projects, options.engineTokenCount, variantPrompts);
    this.#replies = new ReplyPublisher({
      publish: options.publish,
      qos: options.qos,
      stats,
      broker: options.broker,
      variantOf: options.experiments &&
        ((project, sessionId) => options.experiments!.known(project, sessionId)),
    });
    this.#replyTopics = new ReplyTopics(topics, options.replyTopics);
    this.#scheduler = new Scheduler<Job>({
      maxQueue: options.maxQueue,
      maxInFlight: options.maxInFlight,
      run: (job, signal) => this.#run(job, signal),
    });
    this.#line = turnOrder && new TurnLine({
      order: turnOrder,
      wallClock: (receivedAt) => performance.timeOrigin + receivedAt,
    });
    const limits = (project: string) => projectLimits(options, project);
    this.#admission = new Admission({
      ...options,
      prompts: this.#prompts,
      replies: this.#replies,
      replyTopics: this.#replyTopics,
      scheduler: this.#scheduler,
      line: this.#line,
      limits,
      payloadMemory: options.payloadMemory ?? 0,
      now,
      known: (project, sessionId) => options.directory.has(project, sessionId),
      releaseSession: (job) => void finishTurn(job),
    });
    this.#turns = {
      ...options,
      prompts: this.#prompts,
      replies: this.#replies,
      recent: this.#admission.recent,
      // Optional in the gateway's options, required (maybe undefined) in the runner's.
      projectFiles: options.projectFiles,
      storageHealth: options.storageHealth,
      experiments: options.experiments,
      engines: options.engines ?? oneEngine(options.engineHealth),
      now,
    };
    const publish = (target: ReplyTarget, body: ReplyBody) => this.#replies.reply(target, body);
    this.#control = options.controlStore && new ControlTopics({
      store: options.controlStore,
      directory: options.directory,
      topics,
      replyTopics: this.#replyTopics,
      stats,
      operatorToken: options.operatorToken,
      sessionTopicsOnly: options.sessionTopicsOnly,
      maxPayloadBytes: options.limits.maxPayloadBytes,
      publish,
      setPrompt: (project, prompt) => this.#prompts.set(project, prompt),
      defaultPrompt: (project) => options.projects.get(project)!,
      forgetRoute: async (project, sessionId) =>
        await this.#turns.engines.forget?.(sessionKey(project, sessionId)),
      acknowledged: (project, command, sessionId) =>
        this.#acknowledgeOnHint(project, command, sessionId),
      inOrder: (target, run) =>
        this.#admission.queue({
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
        topics,
        projects: files,
        stats,
        limits,
        sessionTopicsOnly: options.sessionTopicsOnly,
        verify: (sessionId) => options.signer?.verify(sessionId) ?? true,
        submit: (request, target, settled) => this.#admission.takeState(request, target, settled),
        publish,
      })
      : undefined;
    this.#feedback = options.experiments && options.historyStore && new FeedbackTopic({
      topics,
      experiments: options.experiments,
      store: options.historyStore,
      stats,
      sessionTopicsOnly: options.sessionTopicsOnly,
      signer: options.signer,
      refuse: (target, error) => this.#replies.refuse(target, error),
      send: (topic, payload) => this.#replies.send(topic, payload),
      answeredBy: options.experimentMonitor &&
        ((project, sessionId, requestId) =>
          options.experimentMonitor!.answeredBy(project, sessionId, requestId)),
      rateLimit: options.rateLimit,
      now,
      stored: options.experimentMonitor &&
        ((project, feedback) => options.experimentMonitor!.feedbackStored(project, feedback)),
    });
    this.#subscriptions = this.#filters();
    // Every project's input and control topics, served here or by another service on the
    // broker, and wherever else this service listens: never a reply topic.
    this.#replyTopics.reserve([
      ...this.#subscriptions,
      topics.input("+"),
      topics.sessionInput("+", "+"),
      ...CONTROL_COMMANDS.flatMap((command) => topics.control("+", command)),
      topics.newSession("+"),
      ...topics.state("+"),
      topics.feedback("+"),
    ]);
  }

  /** Requests waiting in the queue. */
  get queued(): number {
    return this.#scheduler.queued;
  }

  /** Requests being run. */
  get inFlight(): number {
    return this.#scheduler.inFlight;
  }

  /** Whether a session has a request queued, running or in its line across instances. */
  isBusy(project: string, sessionId: string): boolean {
    const key = sessionKey(project, sessionId);
    return this.#scheduler.hasSession(key) || (this.#line?.jobs(key).length ?? 0) > 0;
  }

  /**
   * Gives back what sessions that went idle hold on this thread: requests past
   * the dedup window, rate buckets that have filled up again, expired entries
   * of the session directory. Each is also pruned as requests come; this is
   * for when they stop (the service calls it every few seconds).
   */
  sweep(): void {
    this.#admission.sweep();
    this.#feedback?.sweep();
    this.#options.directory.sweep();
  }

  /** The topic filters this gateway subscribes (as subscribed: shared ones with `$share/`). */
  get subscriptions(): readonly string[] {
    return this.#subscriptions;
  }

  /**
   * Filters an earlier run with other options may have left in the broker's
   * persistent session that overlap this run's, each delivering a second copy
   * of a request: the input wildcards of `--answer-unknown-projects` when
   * this run has them not, each served project's input topics when it has.
   */
  get overlapping(): readonly string[] {
    const { topics } = this.#options;
    const every = this.#options.answerUnknownProjects;
    const filters = every
      ? [...this.#prompts.projects()].flatMap((p) => [topics.input(p), topics.sessionInput(p, "+")])
      : [topics.input("+"), topics.sessionInput("+", "+")];
    return filters.map((filter) => topics.subscription(filter));
  }

  /** Subscribes to every enabled project's input (and control) topics. */
  async subscribe(): Promise<void> {
    await this.#prompts.counted;
    await this.#options.subscribe(this.#subscriptions, this.#options.qos);
    log.info("Subscribed to {filters}", { filters: this.#subscriptions });
  }

  /** The filters of every enabled project's input (and control) topics. */
  #filters(): string[] {
    const { topics } = this.#options;
    // One wildcard rather than both: overlapping filters may deliver a message twice.
    const every = this.#options.answerUnknownProjects;
    const filters: string[] = every ? [topics.input("+"), topics.sessionInput("+", "+")] : [];
    for (const project of this.#prompts.projects()) {
      if (!every) filters.push(topics.input(project), topics.sessionInput(project, "+"));
      if (this.#options.signer) filters.push(topics.newSession(project));
      if (this.#control) filters.push(...this.#control.filters(project));
      if (this.#states) filters.push(...this.#states.filters(project));
      if (this.#feedback && this.#options.experiments?.experiment(project)) {
        filters.push(topics.feedback(project));
      }
    }
    return filters.map((filter) => topics.subscription(filter));
  }

  /**
   * Takes no new requests: those that still arrive are answered `cancelled`
   * with a retry hint. The subscriptions stay, so the broker queues what is
   * sent while the service is down for its next start (persistent session, QoS 1).
   */
  stopAccepting(): void {
    this.#admission.stopAccepting();
    this.#feedback?.stopAccepting();
  }

  /** Handles one incoming MQTT message. Never throws. */
  handle(topic: string, payload: Uint8Array, packet: IPublishPacket): void {
    // A message the broker delivers with the retain flag was kept from some time ago and is
    // replayed at every subscription (every start): acting on it would answer a stale request,
    // or clear histories, once per start.
    if (packet.retain) return this.#ignoreRetained(topic);
    // A message through a subscription this run did not make (left in the broker's persistent
    // session by an earlier run with other projects or options) is not for this run.
    if (!this.#subscriptions.some((filter) => topicMatches(filter, topic))) {
      return this.#ignoreUnsubscribed(topic);
    }
    const target = this.#options.topics.parse(topic);
    const served = target !== undefined && this.#prompts.has(target.project);
    switch (target?.kind) {
      case "control":
        if (served) this.#control?.handle(target, payload, mqtt5Reply(packet));
        return;
      case "new_session":
        return this.#issueSession(target.project, target.nonce);
      case "state":
        if (served) this.#states?.handle(target.project, target.sessionId, payload);
        return;
      case "feedback":
        if (served) void this.#feedback?.handle(target.project, target.sessionId, payload);
        return;
      case "input":
        return this.#admission.request(topic, target.project, target.sessionId, payload, packet);
    }
  }

  /**
   * Takes a request from inside the process (the operator page's "try it"),
   * with every reply handed to `deliver`. Returns a function that cancels it.
   */
  ask(request: ChatRequest, deliver: (body: ReplyBody) => void): () => void {
    return this.#admission.ask(request, deliver);
  }

  /**
   * Stops taking requests and waits up to `timeoutMs` for accepted ones to
   * finish; what is left is cancelled with an error reply. A member of a
   * share group first leaves the group, so that the broker hands new
   * requests to the other members instead of to one that refuses them.
   */
  async drain(timeoutMs: number): Promise<void> {
    const deadline = this.#now() + timeoutMs;
    if (this.#options.topics.shared && this.#subscriptions.length > 0) {
      // Requests the broker sent before it took the unsubscribe arrive before its answer, and
      // are taken. A broker that is gone does not answer: do not wait on it for long.
      await withTimeout(this.#options.unsubscribe(this.#subscriptions), 2000)
        .catch((error) =>
          log.warn("Leaving the share group: {message}", { message: String(error) })
        );
    }
    this.stopAccepting();
    const idle = (async () => {
      await this.#line?.settled();
      await this.#scheduler.idle();
      // Feedback being stored is finished too, before the store closes.
      await this.#feedback?.settled();
    })();
    const outcome = await withTimeout(idle, Math.max(0, deadline - this.#now()))
      .catch(() => "timeout" as const);
    if (outcome !== "timeout") return;
    const leaving = shuttingDown();
    this.#line?.abortAll(leaving);
    await this.#line?.settled();
    for (const job of this.#scheduler.drainQueue()) {
      this.#admission.refuse(job.target, leaving, job);
    }
    this.#scheduler.abortRunning(leaving);
    await this.#scheduler.idle();
  }

  /** Acknowledges a session's template or clear on its hint topic, as the original did. */
  #acknowledgeOnHint(project: string, command: ControlCommand, sessionId: string): void {
    const hint = controlHint(command);
    if (!hint || !this.#options.projectFiles?.get(project)?.hintTopic) return;
    this.#replies.send(this.#options.topics.hint(project, sessionId), JSON.stringify({ hint }));
  }

  /**
   * Hands out a new signed session id on the nonce's reply topic, within the
   * project's allowance of new sessions. Every session here is signed, so a
   * nonce that is not signed is no session's: a signed one (or `all`, or an id
   * that could not be one) would put the answer on a session's reply topic,
   * and is ignored.
   */
  #issueSession(project: string, nonce: string): void {
    const { signer, topics, stats } = this.#options;
    if (!signer || !this.#prompts.has(project)) return;
    if (!SESSION_ID_PATTERN.test(nonce) || signer.verify(nonce)) {
      stats.unaddressable("forbidden");
      return;
    }
    const target: ReplyTarget = {
      project,
      topic: topics.response(project, nonce),
      style: "json",
      sessionId: nonce,
      requestId: undefined,
      correlationData: undefined,
    };
    const wait = this.#admission.startSession(project);
    if (wait > 0) {
      const error = new ServiceError("rate_limited", "too many new sessions: try again later", {
        retryAfterMs: wait,
      });
      return this.#replies.refuse(target, error);
    }
    const id = signer.issue();
    this.#admission.started(project, id);
    this.#replies.send(target.topic, JSON.stringify({ type: "session", session_id: id }));
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

  #ignoreUnsubscribed(topic: string): void {
    this.#options.stats.ignored("unsubscribed");
    log.debug("Ignoring a message on {topic}: no subscription of this run matches it", { topic });
  }

  async #run(job: Job, signal: AbortSignal): Promise<void> {
    if (job.kind === "control") return await job.run();
    try {
      await runTurnJob(this.#turns, job, signal);
    } catch (error) {
      const failure = asServiceError(error);
      if (failure.code === "storage_unavailable") this.#options.storageHealth?.failed(failure);
      this.#admission.refuse(job.target, failure, job);
      // A cancellation (the client's, or a shutdown's) is no fault of the variant's.
      // Nor is a "try it" turn any player's.
      if (job.variant !== undefined && failure.code !== "cancelled" && !job.tryIt) {
        this.#options.experimentMonitor?.turnEnded(
          job.request.project,
          job.request.sessionId,
          job.request.requestId,
          job.variant,
          {
            ok: false,
            errorCode: failure.code,
            totalMs: this.#now() - job.receivedAt,
            tokensIn: 0,
            tokensOut: 0,
          },
        );
      }
    } finally {
      // The next turn of the session, on any instance, may start once this one is saved.
      await finishTurn(job);
    }
  }
}
