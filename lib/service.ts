/**
 * The service, wired: prompts, engine, session store, workers, broker
 * connection, gateway and statistics, started in that order and stopped in
 * reverse.
 *
 * @module
 */

import { join } from "node:path";
import { withTimeout } from "./_util.ts";
import { isListening, startEmbeddedBroker } from "./broker/embedded_broker.ts";
import { type Config, ConfigError } from "./config/config.ts";
import { EngineHealth } from "./engine/engine_health.ts";
import { engineTokenCount } from "./engine/engine_tokenizer.ts";
import { type RunningEngine, startEngine } from "./engine/start_engine.ts";
import { Gateway } from "./gateway/gateway.ts";
import { SessionSigner } from "./gateway/session_signer.ts";
import { logger } from "./log.ts";
import type { MqttClient } from "mqtt";
import { connectMqtt, type MessageHandler, redact, TakeoverWatch } from "./mqtt/connect.ts";
import { Topics } from "./protocol/topics.ts";
import { SessionDirectory } from "./sessions/session_directory.ts";
import { SessionStore } from "./sessions/session_store.ts";
import { checkHeadroom, storageFailure, StorageHealth } from "./sessions/storage_health.ts";
import { TurnOrder } from "./sessions/turn_order.ts";
import { WriteGenerations } from "./sessions/write_generations.ts";
import { isLoopback, serviceDashboard } from "./observability/dashboard.ts";
import { type HttpEndpoint, serveHttpEndpoint } from "./observability/http_endpoint.ts";
import { LiveStats } from "./observability/live_stats.ts";
import { Stats } from "./observability/stats.ts";
import { WorkerPool } from "./workers/worker_pool.ts";
import { plainProject, type Project, readProjectFile } from "./projects/project_file.ts";

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

/** The general prompt when the prompts folder has none (`general.md`). */
const FALLBACK_PROMPT = "You are a helpful assistant. Answer clearly, concisely and accurately.";

/**
 * Reads `prompts/NAME.md` for every project (its system prompt, after a YAML
 * front matter if it has one: see `projects/project_file.ts`). A project
 * without one is served with the general prompt (`general.md`) and nothing
 * else, as the original did for any name, and a warning names the file to
 * create. A file that cannot be read for another reason (permissions), or
 * whose front matter cannot be used, stops the start-up.
 */
export async function loadProjects(config: Config): Promise<Map<string, Project>> {
  const projects = new Map<string, Project>();
  const read = (name: string) => readProjectFile(name, join(config.promptsDir, `${name}.md`));
  let general: string | undefined;
  for (const project of config.projects) {
    const file = await read(project);
    if (file !== undefined) {
      projects.set(project, file);
      continue;
    }
    general ??= (await read("general"))?.prompt ?? FALLBACK_PROMPT;
    projects.set(project, plainProject(project, general));
    log.warn(
      "Project {project} has no system prompt: serving it with the general prompt; create {path} for its own",
      { project, path: join(config.promptsDir, `${project}.md`) },
    );
  }
  checkModels(projects, config);
  return projects;
}

/** The system prompt of every project (see {@linkcode loadProjects}). */
export async function loadPrompts(config: Config): Promise<Map<string, string>> {
  const projects = await loadProjects(config);
  return new Map([...projects].map(([name, project]) => [name, project.prompt]));
}

/**
 * A project's `model` must be one the engine serves: the model, or a LoRA
 * adapter of `--lora-modules` (managed vLLM, simulated engine). An attached
 * engine is asked at run time; one that lacks it answers 404.
 */
function checkModels(projects: ReadonlyMap<string, Project>, config: Config): void {
  if (config.engine === "url") return;
  const served = [config.servedModelName, ...config.loraModules.map(({ name }) => name)];
  for (const project of projects.values()) {
    if (project.model === undefined || served.includes(project.model)) continue;
    throw new ConfigError(
      `${project.file}: front matter key 'model': ${project.model} is not served: ` +
        `add '--lora-modules ${project.model}=PATH' (served now: ${served.join(", ")})`,
    );
  }
}

/**
 * How long a step of the shutdown may wait on the broker: it may be gone, and
 * the Last Will says `offline` for us then.
 */
const BROKER_GOODBYE_MS = 2000;

/** Starts the whole service. */
export async function startService(config: Config): Promise<Service> {
  const projects = await loadProjects(config);
  const prompts = new Map([...projects].map(([name, project]) => [name, project.prompt]));
  const topics = new Topics(
    config.topicPrefix,
    config.serviceName,
    config.shareGroup,
    config.mqttClientId,
  );
  const cleanup: (() => Promise<void> | void)[] = [];
  const undo = async () => {
    for (const step of cleanup.reverse()) await step();
  };
  const parts: Parts = {};
  // Messages the broker delivers before the gateway exists wait, unacknowledged, for it.
  const handler = Promise.withResolvers<MessageHandler>();
  const takenOver = Promise.withResolvers<Error>();
  let takeoverError: Error | undefined;
  try {
    // First, so that liveness answers during a long engine start, and so that a port in use
    // stops the start-up before it touches the broker (where it could knock off a live
    // instance with the same client id).
    if (config.httpPort !== 0) {
      const http = serveOperatorEndpoint(config, parts);
      cleanup.push(() => http.close());
    }
    // The store before the engine: a store that cannot be opened (a full disk) stops the
    // start-up before vLLM spends minutes loading a model for nothing.
    await Deno.mkdir(config.dataDir, { recursive: true });
    const kvPath = config.kvUrl ?? join(config.dataDir, "sessions.kv");
    // Alone on its sessions, the process's threads tell each other of their writes, and a
    // turn whose session nobody else wrote reads nothing from the store.
    const generations = config.shareGroup === undefined && config.kvUrl === undefined
      ? WriteGenerations.create()
      : undefined;
    const store = await openStore(kvPath, config, generations);
    cleanup.push(() => store.close());
    const storageHealth = await watchStorage(store, config);
    parts.storageHealth = storageHealth;
    cleanup.push(() => storageHealth.close());

    const engine = await startEngine(config);
    parts.engine = engine;
    cleanup.push(() => engine.close());
    const engineHealth = new EngineHealth({
      probeUrl: engine.probeUrl,
      apiKey: engine.endpoint.apiKey,
    }).start();
    parts.engineHealth = engineHealth;
    cleanup.push(() => engineHealth.close());
    const turnOrder = config.shareGroup === undefined ? undefined : await TurnOrder.open(kvPath, {
      instance: config.mqttClientId,
      windowMs: config.orderWindowMs,
      instanceTimeoutMs: config.instanceTimeoutMs,
      keepMs: config.sessionTtlMs,
    });
    if (turnOrder) cleanup.push(() => turnOrder.close());

    const pool = await WorkerPool.start(config.workers, {
      endpoint: engine.endpoint,
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
      log: { level: config.logLevel, format: config.logFormat },
    });
    cleanup.push(() => pool.close());

    let brokerUrl = config.mqttUrl;
    let protocolVersion = config.mqttVersion;
    if (brokerUrl === undefined) {
      const port = config.embeddedBrokerPort;
      if (await isListening("127.0.0.1", port)) {
        brokerUrl = `mqtt://127.0.0.1:${port}`;
      } else {
        const broker = await startEmbeddedBroker(port);
        cleanup.push(() => broker.close());
        brokerUrl = `mqtt://127.0.0.1:${broker.port}`;
        // The embedded broker speaks MQTT 3.1.1 only.
        protocolVersion = 4;
        log.info("No broker answered on localhost:{port}; started the embedded broker there", {
          port,
        });
      }
    }

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
    const client = await connectMqtt({
      url: brokerUrl,
      clientId: config.mqttClientId,
      protocolVersion,
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
    });
    parts.client = client;
    // A broker that is gone would keep a graceful end waiting for ever.
    cleanup.push(() =>
      withTimeout(client.endAsync(), BROKER_GOODBYE_MS).catch(() => client.endAsync(true))
    );
    log.info("Connected to broker {url} (MQTT {version})", {
      url: redact(brokerUrl),
      version: protocolVersion === 5 ? "5" : "3.1.1",
    });

    // deno-lint-ignore prefer-const
    let gateway: Gateway;
    const stats = new Stats(() => ({
      queued: gateway.queued,
      inFlight: gateway.inFlight,
      liveSessions: directory.size,
      engineReady: engineHealth.state === "ready",
      engineRestarts: engine.restarts,
    }));
    const directory = new SessionDirectory({
      store,
      maxSessions: config.maxSessions,
      ttlMs: config.sessionTtlMs,
      isBusy: (project, sessionId) => gateway.isBusy(project, sessionId),
    });
    await directory.load();
    gateway = new Gateway({
      client,
      topics,
      projects: prompts,
      pool,
      directory,
      stats,
      engineHealth,
      storageHealth,
      engineWaitMs: config.engineWaitMs,
      limits: config,
      qos: config.qos,
      maxQueue: config.maxQueue,
      maxInFlight: config.maxInFlight,
      dedupWindowMs: config.dedupWindowMs,
      rateLimit: {
        perSession: config.rateLimit,
        perClient: config.rateLimitClient,
        burst: config.rateLimitBurst,
      },
      controlStore: config.controlTopics ? store : undefined,
      answerUnknownProjects: config.answerUnknownProjects,
      sessionTopicsOnly: config.sessionTopicsOnly,
      signer: config.sessionSecret === undefined
        ? undefined
        : new SessionSigner(config.sessionSecret),
      turnOrder,
      engineTokenCount: (text) => engineTokenCount(engine.endpoint, text),
      projectFiles: projects,
    });
    parts.serving = { gateway, directory, stats, live: new LiveStats(stats, config.projects) };
    handler.resolve((topic, payload, packet) => {
      if (topic === topics.status) {
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
    const online = JSON.stringify(onlineStatus);
    // The status also goes to a file, for container health checks that speak no MQTT.
    const statusFile = join(config.dataDir, "status.json");
    const announce = () => {
      client.publish(topics.status, online, { qos: 1, retain: true }, () => {});
      Deno.writeTextFile(statusFile, online).catch(() => {});
    };
    // After a reconnect the Last Will may have said `offline`; say `online` again.
    client.on("connect", (connack) => {
      log.info("Reconnected to the broker");
      stats.brokerReconnected();
      if (!connack.sessionPresent) {
        // Our persistent session is gone (the broker restarted without saving it, or it
        // expired), and with it the requests the broker held for us.
        if (config.shareGroup === undefined) {
          log.warn("The broker kept no session for us: requests sent while we were away are lost");
        }
        const failed = (error: unknown) =>
          log.error("Subscribing again failed: {message}", { message: String(error) });
        gateway.subscribe().catch(failed);
        client.subscribeAsync(topics.status, { qos: 1 }).catch(failed);
      }
      announce();
    });
    await gateway.subscribe();
    // Our own status topic: another instance with our client id shows itself there.
    await client.subscribeAsync(topics.status, { qos: 1 });
    announce();
    log.info("Serving {projects} with model {model}", {
      projects: config.projects,
      model: config.servedModelName,
    });

    const statsTimer = setInterval(() => {
      const report = { instance, ...stats.report() };
      log.info("Stats: {report}", { report: JSON.stringify(report) });
      client.publish(topics.stats, JSON.stringify(report), { qos: 0 });
    }, config.statsIntervalMs);
    cleanup.push(() => clearInterval(statsTimer));

    return {
      brokerUrl,
      failed: Promise.race([engine.failed, takenOver.promise]),
      stop: async () => {
        log.info("Shutting down: finishing accepted requests (up to {s} s)", {
          s: config.shutdownTimeoutMs / 1000,
        });
        clearInterval(statsTimer);
        await gateway.drain(config.shutdownTimeoutMs);
        if (client.connected) {
          await withTimeout(
            client.publishAsync(topics.status, offline, { qos: 1, retain: true }),
            BROKER_GOODBYE_MS,
          ).catch(() => {});
        }
        await Deno.writeTextFile(statusFile, offline).catch(() => {});
        await undo();
        log.info("Stopped");
      },
      killNow: () => engine.killNow(),
    };
  } catch (error) {
    // Nothing held for the gateway is acknowledged: the broker delivers it at the next start.
    handler.reject(error);
    await undo();
    // Taken over during start-up, what failed next is only a consequence.
    throw takeoverError ?? error;
  }
}

/** Room a store that ran out of space must have again before it takes turns. */
const STORAGE_HEADROOM_BYTES = 1024 * 1024;

/**
 * Checks that the session store can be written, and keeps checking.
 *
 * A store that cannot be written at start-up (a full disk) stops the start
 * with the reason, rather than starting not ready: opening a store needs room
 * too (SQLite writes its `-shm` and `-wal` files; on a full disk it fails with
 * "disk I/O error"), and so does each request worker's own connection, so a
 * process started on a full disk would have no store to come back with. The
 * process manager starts it again (the systemd unit: `Restart=on-failure`,
 * every 5 s), and meanwhile the broker keeps the requests sent to it (a
 * persistent session). A store that fills up while the service runs is
 * watched instead: turns are refused until the probe finds room again.
 */
async function watchStorage(store: SessionStore, config: Config): Promise<StorageHealth> {
  const local = config.kvUrl === undefined;
  const health = new StorageHealth({
    probe: async (down) => {
      await store.probe(config.mqttClientId);
      // A local disk that filled up must have room for more than one record again.
      if (down && local) await checkHeadroom(config.dataDir, STORAGE_HEADROOM_BYTES);
    },
  });
  if (!(await health.probeNow())) {
    throw new Error(
      `the session store ${config.kvUrl ?? config.dataDir} cannot be written (${health.reason}): ` +
        `free some space on its disk and start again; its sessions are kept`,
    );
  }
  return health.start();
}

/**
 * Opens the session store; a remote one is read once, so that a wrong URL or
 * token stops the start-up with its reason instead of failing every request.
 */
async function openStore(
  path: string,
  config: Config,
  generations: WriteGenerations | undefined,
): Promise<SessionStore> {
  if (config.kvUrl === undefined) {
    try {
      return await SessionStore.open(path, config.sessionTtlMs, generations);
    } catch (error) {
      // SQLite's "disk I/O error" here most often means no room for its `-shm` file.
      const why = storageFailure(error);
      if (why === undefined) throw error;
      const full = await checkHeadroom(config.dataDir, 64 * 1024).then(() => false, () => true);
      throw new Error(
        `the session store ${path} cannot be opened (${full ? "the disk is full" : why}): ` +
          `free some space on its disk and start again; its sessions are kept`,
      );
    }
  }
  let store: SessionStore | undefined;
  try {
    store = await SessionStore.open(path, config.sessionTtlMs);
    await store.load("_", "_");
    return store;
  } catch (error) {
    store?.close();
    throw new ConfigError(
      `'--kv-url' ${config.kvUrl} cannot be used (is DENO_KV_ACCESS_TOKEN set, and --allow-net given for its host?): ${
        (error as Error).message
      }`,
    );
  }
}

/**
 * A status message on our own status topic, from an instance with our client
 * id that started before us: the instance we would be fighting for the id.
 * Its `online` status says it is there; so does its Last Will (`offline`)
 * arriving while we are connected, fired because our connection just took its
 * session over. A retained `offline` is only an earlier run that has stopped.
 */
function noteStatus(
  payload: Uint8Array,
  retained: boolean,
  instance: string,
  startedAt: string,
  takeover: TakeoverWatch,
): void {
  try {
    const status = JSON.parse(new TextDecoder().decode(payload));
    const there = status?.status === "online" || (status?.status === "offline" && !retained);
    if (
      there && status.instance === instance && typeof status.started_at === "string" &&
      status.started_at < startedAt
    ) {
      takeover.olderInstanceSeen();
    }
  } catch { /* not a status of ours */ }
}

/** The service's parts as they come up, for the HTTP endpoint (which comes up first). */
interface Parts {
  engine?: RunningEngine;
  engineHealth?: EngineHealth;
  storageHealth?: StorageHealth;
  client?: MqttClient;
  serving?: { gateway: Gateway; directory: SessionDirectory; stats: Stats; live: LiveStats };
}

/** The HTTP endpoint, reporting on the parts that are up so far. */
function serveOperatorEndpoint(config: Config, parts: Readonly<Parts>): HttpEndpoint {
  const startedAt = new Date().toISOString();
  const engineState = () => parts.engineHealth?.state ?? "starting";
  const dashboard = config.dashboard ? serviceDashboard(config, parts) : undefined;
  try {
    const endpoint = serveHttpEndpoint(config.httpHost, config.httpPort, {
      page: dashboard && ((request) => dashboard.handle(request)),
      readiness: () => {
        const broker = parts.client?.connected ?? false;
        const engine = engineState() === "ready";
        const serving = parts.serving !== undefined;
        const storage = parts.storageHealth?.available ?? false;
        const reason = parts.storageHealth?.reason;
        return {
          ready: broker && engine && serving && storage,
          broker,
          engine,
          serving,
          storage,
          ...(reason !== undefined && { reason: `session store: ${reason}` }),
        };
      },
      metrics: () => parts.serving?.stats.prometheus() ?? "",
      status: () => ({
        status: parts.serving ? "online" : "starting",
        instance: config.mqttClientId,
        model: config.servedModelName,
        projects: config.projects,
        started_at: startedAt,
        broker: {
          url: config.mqttUrl === undefined ? undefined : redact(config.mqttUrl),
          connected: parts.client?.connected ?? false,
        },
        engine: {
          mode: config.engine,
          state: engineState(),
          restarts: parts.engine?.restarts ?? {},
        },
        queued: parts.serving?.gateway.queued ?? 0,
        in_flight: parts.serving?.gateway.inFlight ?? 0,
        live_sessions: parts.serving?.directory.size ?? 0,
      }),
    });
    if (dashboard && config.dashboardToken === undefined && !isLoopback(config.httpHost)) {
      log.warn(
        'The live page at / (and its "try it" panel) is open to anyone who reaches {host}: ' +
          "set VLLM_MQTT_DASHBOARD_TOKEN, or --no-dashboard",
        { host: config.httpHost },
      );
    }
    // Its event streams stay open: the server cannot shut down before they end.
    return { port: endpoint.port, close: () => (dashboard?.close(), endpoint.close()) };
  } catch (error) {
    if (!(error instanceof Deno.errors.AddrInUse)) throw error;
    throw new ConfigError(
      `'--http-port' ${config.httpPort} on ${config.httpHost} is in use (is another instance running?): ` +
        `choose another port, or 0 to turn the HTTP endpoint off`,
    );
  }
}
