/**
 * Test helpers: a mosquitto broker on a free port, the service as a real
 * child process, and MQTT clients that collect what they receive; temporary
 * folders that go when the test module ends at the latest.
 *
 * The fixtures start all of it for one test and stop it after:
 * {@linkcode withService} (with the simulated engine), {@linkcode withServiceOn}
 * (with a test's own engine at a URL) and {@linkcode withOriginalClient} (with a
 * client as the original deployment's). A test that needs another command line
 * starts the service itself with {@linkcode startService}, or any `deno`
 * command with {@linkcode spawnDeno}.
 *
 * @module
 */

import mqtt, { type IClientOptions, type IPublishPacket, type MqttClient } from "mqtt";
import { type Simulator, type SimulatorOptions, startSimulator } from "../lib/engine/simulator.ts";

export const ROOT = new URL("..", import.meta.url).pathname;

/** Whether the mosquitto broker is installed; tests that need it are skipped otherwise. */
export const HAS_MOSQUITTO = (() => {
  try {
    return new Deno.Command("mosquitto", { args: ["-h"], stdout: "null", stderr: "null" })
      .outputSync().code !== 127;
  } catch {
    return false;
  }
})();
if (!HAS_MOSQUITTO) {
  console.warn("mosquitto is not installed: the mosquitto-only tests are skipped");
}

/**
 * A child's standard output and error, collected as text as they come:
 * `output()` is what has come so far, `pumped` settles once both are read to
 * their end (after the child's exit, which comes first).
 */
export function collectOutput(
  child: Deno.ChildProcess,
): { output: () => string; pumped: Promise<void> } {
  let text = "";
  const decoder = new TextDecoder();
  const pump = async (stream: ReadableStream<Uint8Array>) => {
    for await (const chunk of stream) text += decoder.decode(chunk, { stream: true });
  };
  const pumped = Promise.all([pump(child.stdout), pump(child.stderr)]).then(() => {});
  return { output: () => text, pumped };
}

/** A free TCP port on the loopback interface. */
export function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = listener.addr as Deno.NetAddr;
  listener.close();
  return port;
}

/**
 * Waits until `check` holds, polling every 20 ms, or fails after `timeoutMs`.
 * `what` names what is awaited in the error; a function is asked at the
 * timeout, so that it can say what is still missing.
 */
export async function waitFor(
  check: () => boolean | Promise<boolean>,
  timeoutMs = 10_000,
  what: string | (() => string) = "condition",
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${typeof what === "string" ? what : what()}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** Temporary folders made through {@linkcode tempDir} and not removed yet. */
const tempDirs = new Set<string>();
// What a test leaves behind (it failed, or it stopped a broker without closing it) goes when
// its module ends.
globalThis.addEventListener("unload", () => {
  for (const dir of tempDirs) {
    try {
      Deno.removeSync(dir, { recursive: true });
    } catch { /* gone */ }
  }
});

/**
 * A new temporary folder, removed by {@linkcode removeTempDir} or, at the
 * latest, when the test module ends.
 */
export async function tempDir(prefix: string): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix });
  tempDirs.add(dir);
  return dir;
}

/** Removes a folder made by {@linkcode tempDir}, and all it holds. */
export async function removeTempDir(dir: string): Promise<void> {
  await Deno.remove(dir, { recursive: true }).catch(() => {});
  tempDirs.delete(dir);
}

async function listening(port: number): Promise<boolean> {
  try {
    (await Deno.connect({ hostname: "127.0.0.1", port })).close();
    return true;
  } catch {
    return false;
  }
}

/** A mosquitto started by a test. */
export interface Mosquitto {
  readonly port: number;
  readonly url: string;
  readonly dir: string;
  /** Stops it: SIGKILL (a crash) by default; SIGTERM lets it save its persistence file. */
  stop(signal?: Deno.Signal): Promise<void>;
  /** Starts it again on the same port (after {@linkcode stop}). */
  start(): Promise<void>;
  /** Stops it (SIGKILL) and removes its folder: the end of it. */
  close(): Promise<void>;
}

/** A test that needs mosquitto: reported as ignored where it is not installed. */
export function mosquittoTest(name: string, fn: () => Promise<void>): void {
  Deno.test({ name, ignore: !HAS_MOSQUITTO, fn });
}

/**
 * Starts mosquitto on a free port with `set_tcp_nodelay true` (Nagle costs
 * ~40 ms per small message on loopback) and any extra configuration lines.
 * Its folder goes with {@linkcode Mosquitto.close}, or when the test module ends.
 */
export async function startMosquitto(extra: string[] = [], port = freePort()): Promise<Mosquitto> {
  const dir = await tempDir("vllm-mqtt-mosquitto-");
  const hasListener = extra.some((line) => line.startsWith("listener"));
  const conf = [
    ...(hasListener ? [] : [`listener ${port} 127.0.0.1`, "allow_anonymous true"]),
    "set_tcp_nodelay true",
    "persistence false",
    "max_queued_messages 100000",
    ...extra,
  ].join("\n");
  await Deno.writeTextFile(`${dir}/mosquitto.conf`, conf + "\n");
  let child: Deno.ChildProcess | undefined;
  const broker: Mosquitto = {
    port,
    url: `mqtt://127.0.0.1:${port}`,
    dir,
    async start() {
      child = new Deno.Command("mosquitto", {
        args: ["-c", `${dir}/mosquitto.conf`],
        stdout: "null",
        stderr: "null",
      }).spawn();
      await waitFor(() => listening(port), 10_000, `mosquitto on port ${port}`);
    },
    async stop(signal: Deno.Signal = "SIGKILL") {
      if (!child) return;
      try {
        child.kill(signal);
      } catch { /* gone */ }
      await child.status;
      child = undefined;
    },
    async close() {
      await broker.stop();
      await removeTempDir(dir);
    },
  };
  try {
    await broker.start();
  } catch (error) {
    await broker.close();
    throw error;
  }
  return broker;
}

/** Whether nats-server is installed; tests of its MQTT listener are skipped otherwise. */
export const HAS_NATS = (() => {
  try {
    return new Deno.Command("nats-server", { args: ["--version"], stdout: "null", stderr: "null" })
      .outputSync().success;
  } catch {
    return false;
  }
})();

if (!HAS_NATS) console.warn("nats-server is not installed: the NATS tests are skipped");

/** A broker other than mosquitto (nats-server, RabbitMQ), started by a test. */
export interface OtherBroker {
  /** The MQTT listener's port. */
  readonly port: number;
  readonly url: string;
  /** Everything it logged. */
  readonly log: () => string;
  close(): Promise<void>;
}

/**
 * Starts nats-server with an MQTT listener on a free port (its MQTT support
 * needs a server name and JetStream, whose store goes in a temporary folder).
 */
export async function startNats(): Promise<OtherBroker> {
  const dir = await tempDir("vllm-mqtt-nats-");
  const port = freePort();
  await Deno.writeTextFile(
    `${dir}/nats.conf`,
    [
      "server_name: vllm-mqtt-test",
      `listen: 127.0.0.1:${freePort()}`,
      `jetstream { store_dir: "${dir}/js" }`,
      `mqtt { listen: 127.0.0.1:${port} }`,
    ].join("\n") + "\n",
  );
  const child = new Deno.Command("nats-server", {
    args: ["-c", `${dir}/nats.conf`],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const { output, pumped } = collectOutput(child);
  const close = async () => {
    try {
      child.kill("SIGKILL");
    } catch { /* gone */ }
    await child.status;
    await pumped;
    await removeTempDir(dir);
  };
  try {
    await waitFor(() => listening(port), 20_000, `nats-server's MQTT listener on port ${port}`);
  } catch (error) {
    await close();
    throw new Error(`${(error as Error).message}\n${output()}`);
  }
  return { port, url: `mqtt://127.0.0.1:${port}`, log: output, close };
}

/** RabbitMQ's server script, run as whoever runs the tests (its wrapper in sbin runs `su`). */
const RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/** Whether RabbitMQ is installed; tests of its MQTT plugin are skipped otherwise. */
export const HAS_RABBITMQ = (() => {
  try {
    return Deno.statSync(RABBITMQ_SERVER).isFile;
  } catch {
    return false;
  }
})();

if (!HAS_RABBITMQ) console.warn("rabbitmq-server is not installed: the RabbitMQ test is skipped");

/**
 * Starts a RabbitMQ node of its own (own name, ports and folder) with the
 * MQTT plugin listening on a free port; about 10 s on two cores.
 */
export async function startRabbitMq(): Promise<OtherBroker> {
  const dir = await tempDir("vllm-mqtt-rabbitmq-");
  const port = freePort();
  const amqpPort = freePort();
  await Deno.writeTextFile(`${dir}/enabled_plugins`, "[rabbitmq_mqtt].\n");
  await Deno.writeTextFile(
    `${dir}/rabbitmq.conf`,
    [
      `listeners.tcp.default = 127.0.0.1:${amqpPort}`,
      `mqtt.listeners.tcp.default = 127.0.0.1:${port}`,
      "mqtt.allow_anonymous = true",
    ].join("\n") + "\n",
  );
  const child = new Deno.Command(RABBITMQ_SERVER, {
    env: {
      RABBITMQ_NODENAME: `vllm-mqtt-test-${port}@localhost`,
      RABBITMQ_NODE_PORT: String(amqpPort),
      RABBITMQ_DIST_PORT: String(freePort()),
      RABBITMQ_MNESIA_BASE: `${dir}/mnesia`,
      RABBITMQ_LOG_BASE: `${dir}/log`,
      RABBITMQ_ENABLED_PLUGINS_FILE: `${dir}/enabled_plugins`,
      RABBITMQ_CONFIG_FILE: `${dir}/rabbitmq`,
      RABBITMQ_PID_FILE: `${dir}/pid`,
      RABBITMQ_FEATURE_FLAGS_FILE: `${dir}/feature_flags`,
      RABBITMQ_PLUGINS_EXPAND_DIR: `${dir}/plugins`,
    },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const { output, pumped } = collectOutput(child);
  let exited = false;
  child.status.then(() => exited = true);
  const close = async () => {
    // The script runs the Erlang VM in the background and stops it on SIGTERM (a SIGKILL
    // would leave the VM running, holding our pipes).
    try {
      child.kill("SIGTERM");
    } catch { /* gone */ }
    await child.status;
    await pumped;
    await removeTempDir(dir);
  };
  try {
    await waitFor(
      async () => exited || await listening(port),
      60_000,
      `RabbitMQ's MQTT listener on port ${port}`,
    );
    if (exited) throw new Error("RabbitMQ exited");
  } catch (error) {
    await close();
    throw new Error(`${(error as Error).message}\n${output().slice(-3000)}`);
  }
  return { port, url: `mqtt://127.0.0.1:${port}`, log: output, close };
}

/** A `deno` child process started in the checkout, its output collected. */
export interface DenoProcess {
  readonly child: Deno.ChildProcess;
  /** Everything it wrote to stdout and stderr so far. */
  readonly log: () => string;
  /** Whether it has exited. */
  readonly exited: () => boolean;
  /** Sends `signal` (unless it has exited), waits for it to exit, and returns its exit code. */
  stop(signal?: Deno.Signal): Promise<number>;
}

/** The service running as a child process. */
export type ServiceProcess = DenoProcess;

/**
 * Runs `deno` with `args` in the checkout (or in `root`, another one),
 * collecting its stdout and stderr; `env` is added to the environment it
 * inherits.
 */
export function spawnDeno(
  args: string[],
  env?: Record<string, string>,
  root: string = ROOT,
): DenoProcess {
  const child = new Deno.Command(Deno.execPath(), {
    args,
    cwd: root,
    env,
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const { output, pumped } = collectOutput(child);
  let exited = false;
  child.status.then(() => exited = true);
  return {
    child,
    log: output,
    exited: () => exited,
    async stop(signal: Deno.Signal = "SIGTERM") {
      if (!exited) {
        try {
          child.kill(signal);
        } catch { /* gone */ }
      }
      const status = await child.status;
      await pumped;
      return status.code;
    },
  };
}

/**
 * The permissions `deno task start` grants (the `service` set in deno.json),
 * widened as a user would for the folders and files named in `args`. A flag
 * given next to `-P` replaces the set's list for its kind, so the set's paths
 * are repeated.
 */
export function servicePermissions(args: readonly string[], root: string = ROOT): string[] {
  const set = JSON.parse(Deno.readTextFileSync(`${root}deno.json`)).permissions.service;
  const paths = (...flags: string[]) =>
    flags.flatMap((flag) =>
      args.flatMap((arg, i) =>
        arg === flag
          ? [args[i + 1]]
          : arg.startsWith(`${flag}=`)
          ? [arg.slice(flag.length + 1)]
          : []
      )
    );
  const readable = paths(
    "--data-dir",
    "--prompts-dir",
    "--mqtt-password-file",
    "--tls-ca",
    "--tls-cert",
    "--tls-key",
  );
  const writable = paths("--data-dir");
  return [
    "-P=service",
    ...(readable.length > 0 ? [`--allow-read=${[...set.read, ...readable].join(",")}`] : []),
    ...(writable.length > 0 ? [`--allow-write=${[...set.write, ...writable].join(",")}`] : []),
  ];
}

/** How {@linkcode startService} starts the service. */
export interface StartOptions {
  /**
   * Added to the environment the service inherits (secrets go there rather
   * than on its command line).
   * @default {}
   */
  env?: Record<string, string>;
  /** Whether it is expected to exit during start-up (a refused configuration). @default false */
  expectExit?: boolean;
  /** How long start-up may take before the test fails. @default 30_000 */
  timeoutMs?: number;
  /** Flags for `deno run` itself, before the permissions (e.g. `--cpu-prof`). @default [] */
  denoFlags?: string[];
  /**
   * The checkout whose `main.ts` runs (the bench compares two); its own
   * `deno.json` grants the permissions.
   * @default {ROOT}
   */
  root?: string;
}

/**
 * Runs `main.ts` with `args` and the permissions `deno task start` grants,
 * without waiting for anything ({@linkcode startService} waits until it serves).
 */
export function spawnService(
  args: string[],
  options: Pick<StartOptions, "env" | "denoFlags" | "root"> = {},
): ServiceProcess {
  const root = options.root ?? ROOT;
  return spawnDeno(
    [
      "run",
      ...(options.denoFlags ?? []),
      ...servicePermissions(args, root),
      `${root}main.ts`,
      // Several services run side by side in the tests: no fixed HTTP port unless asked.
      ...(args.some((arg) => arg.startsWith("--http-port")) ? [] : ["--http-port=0"]),
      ...args,
    ],
    options.env,
    root,
  );
}

/**
 * Starts `main.ts` with `args` and the permissions `deno task start` grants,
 * and waits for its "Serving" log line (or for it to exit, when `expectExit`).
 */
export async function startService(
  args: string[],
  options: StartOptions = {},
): Promise<ServiceProcess> {
  const service = spawnService(args, options);
  try {
    await waitFor(
      () =>
        options.expectExit
          ? service.exited()
          : service.log().includes("Serving ") || service.exited(),
      options.timeoutMs ?? 30_000,
      "the service to start",
    );
  } catch (error) {
    await service.stop("SIGKILL");
    throw new Error(`${(error as Error).message}\n--- service log ---\n${service.log()}`);
  }
  if (service.exited() && !options.expectExit) {
    await service.stop();
    throw new Error(`the service exited during start-up:\n${service.log()}`);
  }
  return service;
}

/** A received message. */
export interface Received {
  readonly topic: string;
  readonly text: string;
  readonly packet: IPublishPacket;
  /** The payload parsed as JSON, or undefined for plain text. */
  readonly json: Record<string, unknown> | undefined;
}

/** An MQTT test client that keeps everything it receives. */
export class TestClient {
  readonly client: MqttClient;
  readonly received: Received[] = [];
  readonly #waiters = new Set<() => void>();

  private constructor(client: MqttClient) {
    this.client = client;
    client.on("message", (topic, payload, packet) => {
      const text = new TextDecoder().decode(payload);
      let json: Record<string, unknown> | undefined;
      try {
        const parsed = JSON.parse(text);
        if (typeof parsed === "object" && parsed !== null) json = parsed;
      } catch { /* plain text */ }
      this.received.push({ topic, text, packet, json });
      for (const wake of this.#waiters) wake();
    });
  }

  static async connect(url: string, options: IClientOptions = {}): Promise<TestClient> {
    const client = await mqtt.connectAsync(url, { reconnectPeriod: 200, ...options });
    return new TestClient(client);
  }

  async subscribe(filter: string | string[], qos: 0 | 1 = 1): Promise<void> {
    await this.client.subscribeAsync(filter, { qos });
  }

  async send(
    topic: string,
    payload: unknown,
    options: mqtt.IClientPublishOptions = {},
  ): Promise<void> {
    const body = typeof payload === "string" || payload instanceof Uint8Array
      ? payload
      : JSON.stringify(payload);
    await this.client.publishAsync(topic, body as string, { qos: 1, ...options });
  }

  /** Waits for the first received message `match` accepts (earlier ones included). */
  next(match: (message: Received) => boolean, timeoutMs = 15_000): Promise<Received> {
    return new Promise((resolve, reject) => {
      const check = () => {
        const found = this.received.find(match);
        if (!found) return false;
        clearTimeout(timer);
        this.#waiters.delete(wake);
        resolve(found);
        return true;
      };
      const wake = () => void check();
      const timer = setTimeout(() => {
        this.#waiters.delete(wake);
        reject(
          new Error(
            `no matching message within ${timeoutMs} ms; received:\n${
              this.received.map((m) => `${m.topic} ${m.text}`).join("\n").slice(-3000)
            }`,
          ),
        );
      }, timeoutMs);
      if (!check()) this.#waiters.add(wake);
    });
  }

  /** The final reply (`done` or `error`) for a session, optionally for one request id. */
  final(sessionId: string, requestId?: string, timeoutMs?: number): Promise<Received> {
    return this.next((m) =>
      m.json?.session_id === sessionId &&
      (m.json.type === "done" || m.json.type === "error") &&
      (requestId === undefined || m.json.request_id === requestId), timeoutMs);
  }

  async close(): Promise<void> {
    await this.client.endAsync(true);
  }
}

/** What {@linkcode withServiceOn} starts the service with. */
export interface ServiceOptions {
  /**
   * Flags after the fixture's own (`--projects=maze,general`, `--workers=2`
   * and the engine, broker and data folder): a flag given again here wins.
   * @default []
   */
  args?: string[];
  /** Whether the test client speaks MQTT 5 rather than 3.1.1. @default false */
  mqtt5?: boolean;
  /** Configuration lines for the broker, as {@linkcode startMosquitto} takes them. @default [] */
  brokerConfig?: string[];
  /** The service's environment (secrets go there rather than on its command line). @default {} */
  env?: Record<string, string>;
}

/** What {@linkcode withServiceOn} gives a test. */
export interface ServiceFixture {
  broker: Mosquitto;
  /** The service; a test that restarts it puts the new one here, to be stopped at the end. */
  service: ServiceProcess;
  /** Subscribed to the replies of the projects `maze` and `general`. */
  client: TestClient;
  dataDir: string;
  /** The service's command line. */
  args: string[];
}

/**
 * Runs `fn` against a fresh broker, the service on the engine at `engineUrl`
 * (an OpenAI-compatible base URL, e.g. a test's own stand-in engine) and a
 * client; all of it goes when `fn` ends. The service's log is printed when
 * `fn` fails.
 */
export async function withServiceOn(
  engineUrl: string,
  options: ServiceOptions,
  fn: (f: ServiceFixture) => Promise<void>,
): Promise<void> {
  const broker = await startMosquitto(options.brokerConfig);
  const dataDir = await tempDir("vllm-mqtt-data-");
  const args = [
    "--engine=url",
    `--engine-url=${engineUrl}`,
    `--mqtt-url=${broker.url}`,
    `--data-dir=${dataDir}`,
    "--projects=maze,general",
    "--workers=2",
    `--mqtt-client-id=svc-${crypto.randomUUID()}`,
    ...(options.args ?? []),
  ];
  let fixture: ServiceFixture | undefined;
  let client: TestClient | undefined;
  try {
    const service = await startService(args, { env: options.env });
    fixture = { broker, service, client: undefined!, dataDir, args };
    client = await TestClient.connect(broker.url, { protocolVersion: options.mqtt5 ? 5 : 4 });
    await client.subscribe(["maze/assistant_response/#", "general/assistant_response/#"]);
    fixture.client = client;
    await fn(fixture);
  } catch (error) {
    if (fixture) console.error(`--- service log ---\n${fixture.service.log().slice(-4000)}`);
    throw error;
  } finally {
    await client?.close();
    // The service the fixture holds now: a test that restarts it puts the new one there.
    await fixture?.service.stop();
    await broker.close();
    await removeTempDir(dataDir);
  }
}

/** What {@linkcode withService} gives a test: {@linkcode ServiceFixture} and the engine. */
export interface Fixture extends ServiceFixture {
  sim: Simulator;
}

/**
 * A client as the original deployment's are: MQTT 3.1.1, subscribed to
 * `filter` at QoS 0; its replies come as plain text unless it asks for JSON.
 */
export async function originalClient(url: string, filter: string | string[]): Promise<TestClient> {
  const client = await TestClient.connect(url, { protocolVersion: 4 });
  await client.subscribe(filter, 0);
  return client;
}

/** What {@linkcode withService} starts the service and its simulated engine with. */
export interface SimServiceOptions extends ServiceOptions {
  /** The simulated engine's options. @default { ttftMs: 5, itlMs: 1 } */
  sim?: SimulatorOptions;
}

/** Runs `fn` against a fresh simulated engine, broker, service and client. */
export async function withService(
  options: SimServiceOptions,
  fn: (f: Fixture) => Promise<void>,
): Promise<void> {
  const sim = await startSimulator({ ttftMs: 5, itlMs: 1, ...options.sim });
  try {
    // The same object, so that what a test changes in it (a restarted service) is what
    // withServiceOn stops.
    await withServiceOn(sim.url, options, (fixture) => fn(Object.assign(fixture, { sim })));
  } finally {
    await sim.close();
  }
}

/**
 * Runs `fn` with an {@linkcode originalClient} subscribed to `options.filter`
 * against a fresh simulated engine, broker and service ({@linkcode withService});
 * the client goes when `fn` ends.
 */
export async function withOriginalClient(
  options: SimServiceOptions & { filter: string | string[] },
  fn: (original: TestClient, f: Fixture) => Promise<void>,
): Promise<void> {
  await withService(options, async (fixture) => {
    const original = await originalClient(fixture.broker.url, options.filter);
    try {
      await fn(original, fixture);
    } finally {
      await original.close();
    }
  });
}
