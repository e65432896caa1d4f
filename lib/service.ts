/**
 * The service, wired: prompts, engine, session store, workers, broker
 * connection, gateway and statistics, started in that order and stopped in
 * reverse.
 *
 * @module
 */

import { join } from "node:path";
import type { IConnackPacket, MqttClient } from "mqtt";
import { withTimeout } from "./_util.ts";
import { isListening, startEmbeddedBroker } from "./broker/embedded_broker.ts";
import type { Config } from "./config/config.ts";
import { EngineFleet } from "./engine/engine_fleet.ts";
import { engineTokenCount } from "./engine/engine_tokenizer.ts";
import { FleetRouting } from "./gateway/fleet_routing.ts";
import { RouteLedger } from "./routing/route_ledger.ts";
import { Router } from "./routing/router.ts";
import { Gateway, type GatewayOptions } from "./gateway/gateway.ts";
import type { Publish } from "./gateway/reply_publisher.ts";
import { SessionSigner } from "./gateway/session_signer.ts";
import { Experiments } from "./gateway/experiments.ts";
import { logger } from "./log.ts";
import {
  connectMqtt,
  type MessageHandler,
  protocolOf,
  redact,
  sessionPresent,
  sharedSubscriptionRefusal,
  TakeoverWatch,
} from "./mqtt/connect.ts";
import { replaceSubscriptions } from "./service/subscriptions.ts";
import { BrokerDrops, DROPPED_TOPIC } from "./service/broker_drops.ts";
import { PacketLimit, topicRefusal } from "./mqtt/broker_limits.ts";
import { Topics } from "./protocol/topics.ts";
import { SessionDirectory } from "./sessions/session_directory.ts";
import { TurnOrder } from "./sessions/turn_order.ts";
import { WriteGenerations } from "./sessions/write_generations.ts";
import { LiveStats } from "./observability/live_stats.ts";
import { Stats } from "./observability/stats.ts";
import type { Project } from "./projects/project_file.ts";
import { ExperimentMonitor } from "./observability/experiment_monitor.ts";
import { openKv } from "./sessions/_util.ts";
import { InProcessPool } from "./workers/in_process_pool.ts";
import type { WorkerSettings } from "./workers/messages.ts";
import type { TurnPool } from "./workers/turn_pool.ts";
import { WorkerPool } from "./workers/worker_pool.ts";
import { loadProjects } from "./service/projects.ts";
import { type Parts, serveOperatorEndpoint } from "./service/operator_endpoint.ts";
import { noteStatus } from "./service/status.ts";
import { openStore, prepareDataDir, watchStorage } from "./service/storage.ts";

export { loadProjects } from "./service/projects.ts";

/** A running service. */
export interface Service {
  /** The broker it is connected to. */
  readonly brokerUrl: string;
  /**
   * Resolves with a reason when a part fails for good (vLLM gave up, or
   * another instance took our MQTT client id).
   */
  readonly failed: Promise<Error>;
  /** Stops taking requests, finishes or cancels accepted ones, and closes everything. */
  stop(): Promise<void>;
  /** Kills child processes at once, for a program that is dying. */
  killNow(): void;
}

const log = logger("service");

/** Options of {@linkcode startService}. */
export interface StartServiceOptions {
  /**
   * Aborted to stop the start-up: what was started is closed, and the start
   * rejects with the signal's reason.
   * @default {undefined}
   */
  readonly signal?: AbortSignal;
}

/**
 * How long a step of the shutdown may wait on the broker: it may be gone, and
 * the Last Will says `offline` for us then.
 */
const BROKER_GOODBYE_MS = 2000;
/**
 * How often what idle sessions hold on the gateway's thread is given back
 * (see `Gateway.sweep`): often enough that a burst of new sessions leaves
 * little behind for long, rarely enough to cost nothing.
 */
const SWEEP_INTERVAL_MS = 10_000;

/** Starts the whole service. */
export async function startService(
  config: Config,
  options: StartServiceOptions = {},
): Promise<Service> {
  const { signal } = options;
  const step = startupStep(signal);
  const projects = await loadProjects(config);
  const prompts = new Map([...projects].map(([name, project]) => [name, project.prompt]));
  const topics = new Topics(
    config.topicPrefix,
    config.serviceName,
    config.shareGroup,
    config.mqttClientId,
  );
  // What was started, closed in reverse order at the stop or when the start-up fails.
  const cleanup = new AsyncDisposableStack();
  const parts: Parts = {};
  // Messages the broker delivers before the gateway exists wait, unacknowledged, for it.
  const handler = Promise.withResolvers<MessageHandler>();
  // Rejected when the start-up fails, maybe before the connection that awaits it exists:
  // the start-up's own error says what went wrong.
  handler.promise.catch(() => {});
  const takenOver = Promise.withResolvers<Error>();
  let takeoverError: Error | undefined;
  try {
    // First, so that liveness answers during a long engine start, and so that a port in use
    // stops the start-up before it touches the broker (where it could knock off a live
    // instance with the same client id).
    if (config.httpPort !== 0) {
      const http = serveOperatorEndpoint(config, parts);
      cleanup.defer(() => http.close());
    }
    // The store before the engine: a store that cannot be opened (a full disk) stops the
    // start-up before vLLM spends minutes loading a model for nothing.
    await prepareDataDir(config.dataDir);
    const kvPath = config.kvUrl ?? join(config.dataDir, "sessions.kv");
    // Alone on its sessions, the process's threads tell each other of their writes, and a
    // turn whose session nobody else wrote reads nothing from the store.
    const generations = config.shareGroup === undefined && config.kvUrl === undefined
      ? WriteGenerations.create()
      : undefined;
    const store = await step(openStore(kvPath, config, generations), (s) => s.close());
    cleanup.defer(() => store.close());
    const storageHealth = await watchStorage(store, config);
    parts.storageHealth = storageHealth;
    cleanup.defer(() => storageHealth.close());

    // The models and adapters the projects and their experiments' variants ask for by name.
    const models = [
      ...new Set([...projects.values()].flatMap((p) => [
        ...(p.model === undefined ? [] : [p.model]),
        ...(p.experiment?.variants ?? []).flatMap((v) => v.model ?? []),
      ])),
    ];
    // Set once the fleet is up: told of each engine's circuit opening and closing.
    let routing: FleetRouting | undefined;
    const fleet = await step(
      EngineFleet.start(config, {
        tools: [...projects.values()].some((project) => project.tools !== undefined),
        models,
      }, { signal, onHealth: (index, ready) => routing?.health(index, ready) }),
      (f) => f.close(),
    );
    parts.engines = fleet;
    cleanup.defer(() => fleet.close());
    const engine = fleet.first.running;
    if (fleet.engines.length > 1) {
      // In a share group the instances agree on each session's home through the shared store.
      const ledgerKv = config.shareGroup === undefined ? undefined : await openKv(kvPath);
      if (ledgerKv) cleanup.defer(() => ledgerKv.close());
      const ledger = ledgerKv && new RouteLedger(ledgerKv, { ttlMs: config.sessionTtlMs });
      routing = startRouting(config, fleet, models, ledger);
      parts.routing = routing;
      cleanup.defer(() => routing?.close());
    }
    const turnOrder = config.shareGroup === undefined ? undefined : await TurnOrder.open(kvPath, {
      instance: config.mqttClientId,
      windowMs: config.orderWindowMs,
      instanceTimeoutMs: config.instanceTimeoutMs,
      keepMs: config.sessionTtlMs,
    });
    if (turnOrder) cleanup.defer(() => turnOrder.close());
    // Said again on the status topic once it is up, when a variant is stopped (here or by
    // another instance, the guardrail or the operator).
    let announce = () => {};
    // The sessions' experiment variants, in the sessions' store (every instance reads them).
    const experiments = [...projects.values()].some((p) => p.experiment !== undefined)
      ? await Experiments.open(kvPath, {
        projects,
        ttlMs: config.sessionTtlMs,
        onControl: () => announce(),
      })
      : undefined;
    if (experiments) cleanup.defer(() => experiments.close());
    parts.experiments = experiments;
    const experimentMonitor = experiments
      ? await step(
        startExperimentMonitor(config, projects, kvPath, async (project, variant, reason) => {
          await experiments.decide(project, { stop: variant, reason });
        }),
        (m) => m.close(),
      )
      : undefined;
    if (experimentMonitor) cleanup.defer(() => experimentMonitor.close());

    const settings = workerSettings(config, fleet, kvPath, generations);
    // `--workers 0`: turns run on this thread, against the service's own store.
    const pool: TurnPool = config.workers === 0
      ? await step(InProcessPool.start(settings, store), (p) => p.close())
      : await step(WorkerPool.start(config.workers, settings), (p) => p.close());
    cleanup.defer(() => pool.close());

    const { brokerUrl, protocolVersion, embedded } = await chooseBroker(config, cleanup);

    parts.broker = { url: redact(brokerUrl), embedded };
    const instance = config.mqttClientId;
    const startedAt = new Date().toISOString();
    const takeover = new TakeoverWatch();
    // With its start time, so that another instance with our id knows which of us is older.
    const offline = JSON.stringify({
      status: "offline",
      instance,
      model: config.servedModelName,
      started_at: startedAt,
    });
    const packetLimit = new PacketLimit(config.mqttMaxPacketBytes, protocolVersion !== 4);
    const client = await step(
      connectMqtt({
        url: brokerUrl,
        clientId: config.mqttClientId,
        protocolVersion,
        packetLimit,
        username: config.mqttUsername,
        password: config.mqttPassword,
        tlsCa: config.tlsCa,
        tlsCert: config.tlsCert,
        tlsKey: config.tlsKey,
        will: { topic: topics.status, payload: offline },
        persistentSession: config.shareGroup === undefined,
        handler: handler.promise,
        takeover,
        onTakeover: (error) => {
          takeoverError = error;
          takenOver.resolve(error);
        },
      }),
      (c) => c.end(true),
    );
    parts.client = client;
    // A broker that is gone would keep a graceful end waiting for ever.
    cleanup.defer(() =>
      withTimeout(client.endAsync(), BROKER_GOODBYE_MS).catch(() => client.endAsync(true))
    );
    log.info("Connected to broker {url} (MQTT {version}{limit})", {
      url: redact(brokerUrl),
      version: protocolOf(client) === 5 ? "5" : "3.1.1",
      limit: packetLimit.bytes === Infinity ? "" : `, packets up to ${packetLimit.bytes} bytes`,
    });
    if (config.shareGroup !== undefined) await requireSharedSubscriptions(client, config);

    // deno-lint-ignore prefer-const
    let gateway: Gateway;
    const stats = new Stats(() => ({
      queued: gateway.queued,
      inFlight: gateway.inFlight,
      liveSessions: directory.size,
      engineReady: fleet.state === "ready",
      engineRestarts: fleet.restarts,
      ...(routing && { engines: routing.engineGauges() }),
    }));
    const directory = new SessionDirectory({
      store,
      maxSessions: config.maxSessions,
      ttlMs: config.sessionTtlMs,
      isBusy: (project, sessionId) => gateway.isBusy(project, sessionId),
    });
    await step(directory.load());
    gateway = new Gateway({
      ...gatewayBroker(client, packetLimit, config, topics),
      ...gatewayLimits(config),
      pool,
      topics,
      projects: prompts,
      directory,
      stats,
      engineHealth: fleet.first.health,
      engines: routing,
      storageHealth,
      controlStore: config.controlTopics ? store : undefined,
      turnOrder,
      engineTokenCount: (text) => engineTokenCount(engine.endpoint, text),
      projectFiles: projects,
      experiments,
      historyStore: store,
      experimentMonitor,
    });
    const drops = new BrokerDrops();
    handler.resolve((topic, payload, packet) => {
      if (topic === DROPPED_TOPIC) drops.note(payload);
      else if (topic === topics.status) {
        noteStatus(payload, packet.retain, instance, startedAt, takeover);
      } else gateway.handle(topic, payload, packet);
    });
    const onlineStatus = {
      status: "online",
      instance,
      model: config.servedModelName,
      projects: config.projects,
      started_at: startedAt,
    };
    // The status also goes to a file, for container health checks that speak no MQTT.
    const statusFile = join(config.dataDir, "status.json");
    announce = () => {
      // The variants stopped, as every instance reads them from the store (a restart too).
      const stopped = experiments?.stoppedVariants() ?? {};
      const online = JSON.stringify(
        Object.keys(stopped).length === 0
          ? onlineStatus
          : { ...onlineStatus, stopped_variants: stopped },
      );
      client.publish(topics.status, online, { qos: 1, retain: true }, () => {});
      Deno.writeTextFile(statusFile, online).catch(() => {});
    };
    client.on(
      "connect",
      (connack) => reconnected(connack, { client, config, topics, gateway, stats, announce }),
    );
    await gateway.subscribe();
    // Our own status topic: another instance with our client id shows itself there.
    await client.subscribeAsync(topics.status, { qos: 1 });
    // A broker without it (or whose ACL hides it) refuses or never publishes: nothing lost.
    await client.subscribeAsync(DROPPED_TOPIC, { qos: 0 }).catch(() => {});
    if (config.shareGroup === undefined) {
      await replaceSubscriptions({
        dataDir: config.dataDir,
        broker: redact(brokerUrl),
        clientId: config.mqttClientId,
        sessionPresent: sessionPresent(client),
        current: [...gateway.subscriptions, topics.status, DROPPED_TOPIC],
        overlapping: gateway.overlapping,
        unsubscribe: (filters) => client.unsubscribeAsync(filters).then(() => {}),
      });
    }
    announce();
    // Ready (`/readyz`) once subscribed: a request sent before would reach no one.
    parts.serving = {
      gateway,
      directory,
      stats,
      live: new LiveStats(stats, config.projects),
      experiments: experimentMonitor,
    };
    log.info("Serving {projects} with model {model}", {
      projects: config.projects,
      model: config.servedModelName,
    });

    const statsTimer = setInterval(() => {
      const report = { instance, ...stats.report() };
      log.info("Stats: {report}", { report: JSON.stringify(report) });
      client.publish(topics.stats, JSON.stringify(report), { qos: 0 });
    }, config.statsIntervalMs);
    cleanup.defer(() => clearInterval(statsTimer));
    const sweepTimer = setInterval(() => gateway.sweep(), SWEEP_INTERVAL_MS);
    cleanup.defer(() => clearInterval(sweepTimer));

    return {
      brokerUrl,
      failed: Promise.race([fleet.failed, takenOver.promise]),
      stop: async () => {
        log.info("Shutting down: finishing accepted requests (up to {s} s)", {
          s: config.shutdownTimeoutMs / 1000,
        });
        clearInterval(statsTimer);
        await gateway.drain(config.shutdownTimeoutMs);
        // From here the status says only `offline` (a variant stopped now must not say `online`).
        announce = () => {};
        if (client.connected) {
          await withTimeout(
            client.publishAsync(topics.status, offline, { qos: 1, retain: true }),
            BROKER_GOODBYE_MS,
          ).catch(() => {});
        }
        await Deno.writeTextFile(statusFile, offline).catch(() => {});
        await cleanup.disposeAsync();
        log.info("Stopped");
      },
      killNow: () => fleet.killNow(),
    };
  } catch (error) {
    // Nothing held for the gateway is acknowledged: the broker delivers it at the next start.
    handler.reject(error);
    await cleanup.disposeAsync();
    // Taken over during start-up, what failed next is only a consequence.
    throw takeoverError ?? error;
  }
}

/**
 * The per-variant figures of the projects with an experiment, on a store
 * connection of their own, with the guardrail when `--guardrail` is on: it
 * stops a variant through the experiment's control (`stop`), which tells the
 * status topic.
 */
async function startExperimentMonitor(
  config: Config,
  projects: ReadonlyMap<string, Project>,
  kvPath: string,
  stop: (project: string, variant: string, reason: string) => Promise<void>,
): Promise<ExperimentMonitor> {
  const kv = await openKv(kvPath);
  const experiments = new Map(
    [...projects].flatMap(([name, project]) =>
      project.experiment
        ? [
          [name, {
            salt: project.experiment.salt,
            variants: project.experiment.variants.map((v) => v.name),
          }] as const,
        ]
        : []
    ),
  );
  try {
    return await ExperimentMonitor.open({
      kv,
      ownsStore: true,
      experiments,
      retentionMs: config.outcomeRetentionMs,
      guardrail: config.guardrail
        ? {
          errorRate: config.guardrailErrorMargin,
          ttfd: config.guardrailTtfdMargin,
          minSessions: config.guardrailMinSessions,
          intervalMs: config.guardrailIntervalMs,
        }
        : undefined,
      stopVariant: stop,
    });
  } catch (error) {
    kv.close();
    throw error;
  }
}

/**
 * Returns how to wait for one step of the start-up, unless the start-up is
 * stopped first (`signal`); what the step brings up after that is closed by
 * `close`.
 */
function startupStep(
  signal: AbortSignal | undefined,
): <T>(work: Promise<T>, close?: (value: T) => unknown) => Promise<T> {
  return <T>(work: Promise<T>, close?: (value: T) => unknown): Promise<T> => {
    if (!signal) return work;
    signal.throwIfAborted();
    const { promise, reject } = Promise.withResolvers<never>();
    const onAbort = () => reject(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    work.then((value) => {
      if (signal.aborted) close?.(value);
    }, () => {});
    return Promise.race([work, promise]).finally(() =>
      signal.removeEventListener("abort", onAbort)
    );
  };
}

/**
 * The broker to connect to: `--mqtt-url`; else whatever listens on the
 * embedded broker's port on localhost; else the embedded broker, started
 * there (closed by `cleanup`).
 */
async function chooseBroker(
  config: Config,
  cleanup: AsyncDisposableStack,
): Promise<{ brokerUrl: string; protocolVersion: 4 | 5 | "auto"; embedded: boolean }> {
  if (config.mqttUrl !== undefined) {
    return { brokerUrl: config.mqttUrl, protocolVersion: config.mqttVersion, embedded: false };
  }
  const port = config.embeddedBrokerPort;
  if (await isListening("127.0.0.1", port)) {
    // Said, so that a program there that is no MQTT broker is seen for what it is.
    log.info("Something listens on localhost:{port}: using it as the broker", { port });
    return {
      brokerUrl: `mqtt://127.0.0.1:${port}`,
      protocolVersion: config.mqttVersion,
      embedded: false,
    };
  }
  const broker = await startEmbeddedBroker(port);
  cleanup.defer(() => broker.close());
  log.info(
    "No broker answered on localhost:{port}; started the embedded broker there (MQTT 3.1.1 " +
      "only: it refuses MQTT 5 clients; run mosquitto for them)",
    { port },
  );
  // The embedded broker (aedes) speaks MQTT 3.1.1 only.
  return { brokerUrl: `mqtt://127.0.0.1:${broker.port}`, protocolVersion: 4, embedded: true };
}

/** Stops the start-up when the broker cannot serve `--share-group` (no shared subscriptions). */
async function requireSharedSubscriptions(client: MqttClient, config: Config): Promise<void> {
  const refusal = await sharedSubscriptionRefusal(
    client,
    config.shareGroup!,
    `${config.serviceName}/probe/${config.mqttClientId}`,
  );
  if (refusal === undefined) return;
  throw new Error(
    `--share-group ${config.shareGroup} cannot work on this broker: ${refusal}; ` +
      `run one instance without --share-group, or use a broker with shared subscriptions`,
  );
}

/**
 * The router over several engines, each a candidate for the models it lists
 * (one whose list is unknown, for every model a project asks for), and every
 * one for a turn that names no model (it is sent to the engine's own).
 */
function startRouting(
  config: Config,
  fleet: EngineFleet,
  models: readonly string[],
  ledger: RouteLedger | undefined,
): FleetRouting {
  const everything = [config.servedModelName, ...models];
  const router = new Router(
    fleet.engines.map(({ id, running }) => ({
      id,
      models: [...new Set([config.servedModelName, ...running.serves ?? everything])],
    })),
    { policy: config.routePolicy },
  );
  return new FleetRouting({ fleet, router, model: config.servedModelName, ledger }).start();
}

/** What the request workers are started with. */
function workerSettings(
  config: Config,
  fleet: EngineFleet,
  kvPath: string,
  generations: WriteGenerations | undefined,
): WorkerSettings {
  const engine = fleet.first.running;
  return {
    endpoint: engine.endpoint,
    endpoints: fleet.engines.map(({ running }) => running.endpoint),
    kvPath,
    writeGenerations: generations?.buffer,
    sessionTtlMs: config.sessionTtlMs,
    maxHistoryTokens: config.maxHistoryTokens,
    trimLowWater: config.trimLowWater,
    maxModelLen: config.maxModelLen,
    maxTokens: config.maxTokens,
    requestTimeoutMs: config.requestTimeoutMs,
    engineRetries: config.engineRetries,
    skipThinking: config.skipThinking,
    thinkingOpened: engine.thinkingOpened ?? false,
    log: { level: config.logLevel, format: config.logFormat },
  };
}

/** The gateway's broker: the MQTT client as functions, and what the broker takes. */
function gatewayBroker(
  client: MqttClient,
  packetLimit: PacketLimit,
  config: Config,
  topics: Topics,
): Pick<GatewayOptions, "publish" | "broker" | "subscribe" | "unsubscribe"> {
  return {
    publish: publishOn(client),
    broker: {
      fits: (topic, payload, qos, correlationData) =>
        packetLimit.fits(topic, payload, qos, correlationData),
      get maxPacketBytes() {
        return packetLimit.bytes;
      },
      topicRefusal: (topic) => topicRefusal(config.brokerProfile, topic),
    },
    // No Local (MQTT 5): the broker never hands the service its own publications, so that
    // nothing it publishes can become a request or a command to it. A shared subscription
    // may not ask for it (MQTT 5, 3.8.3.1): there the reply topic rules alone keep replies
    // off the topics it listens to.
    subscribe: (filters, qos) =>
      client.subscribeAsync(filters, {
        qos,
        ...(protocolOf(client) === 5 && !topics.shared && { nl: true }),
      }).then(() => {}),
    unsubscribe: (filters) => client.unsubscribeAsync(filters).then(() => {}),
  };
}

/** The gateway's limits and admission rules, as configured. */
function gatewayLimits(config: Config) {
  return {
    engineWaitMs: config.engineWaitMs,
    limits: config,
    qos: config.qos,
    maxQueue: config.maxQueue,
    maxInFlight: config.maxInFlight,
    payloadMemory: config.payloadMemory,
    dedupWindowMs: config.dedupWindowMs,
    rateLimit: {
      perSession: config.rateLimit,
      perClient: config.rateLimitClient,
      burst: config.rateLimitBurst,
      newSessions: config.rateLimitNewSessions,
    },
    answerUnknownProjects: config.answerUnknownProjects,
    sessionTopicsOnly: config.sessionTopicsOnly,
    signer: config.sessionSecret === undefined
      ? undefined
      : new SessionSigner(config.sessionSecret),
    replyTopics: config.replyTopics,
    operatorToken: config.operatorToken,
  } satisfies Partial<GatewayOptions>;
}

/**
 * After a reconnect: subscribes again where the broker kept no session, and
 * says `online` again (the Last Will may have said `offline`).
 */
function reconnected(
  connack: IConnackPacket,
  { client, config, topics, gateway, stats, announce }: {
    client: MqttClient;
    config: Config;
    topics: Topics;
    gateway: Gateway;
    stats: Stats;
    announce: () => void;
  },
): void {
  const failed = (error: unknown) =>
    log.error("Subscribing again failed: {message}", { message: String(error) });
  log.info("Reconnected to the broker");
  stats.brokerReconnected();
  if (!connack.sessionPresent) {
    // Our persistent session is gone (the broker restarted without saving it, or it
    // expired), and with it the requests the broker held for us.
    if (config.shareGroup === undefined) {
      log.warn("The broker kept no session for us: requests sent while we were away are lost");
    }
    gateway.subscribe().catch(failed);
  }
  // Also with our session kept: the retained status it sends again says whether another
  // instance with our client id announced itself since we did. (`resubscribe`: the client
  // skips a filter it holds already.)
  client.subscribeAsync({ [topics.status]: { qos: 1 }, resubscribe: true } as never)
    .catch(failed);
  announce();
}

/** Publishes on `client`; the promise settles when the message is sent (or not). */
function publishOn(client: MqttClient): Publish {
  return (topic, payload, { qos, correlationData }) => {
    const { promise, resolve, reject } = Promise.withResolvers<void>();
    // Properties only for an MQTT 5 request that carried Correlation Data.
    const properties = correlationData ? { correlationData: correlationData as never } : undefined;
    client.publish(
      topic,
      payload,
      { qos, properties },
      (error) => error ? reject(error) : resolve(),
    );
    return promise;
  };
}
