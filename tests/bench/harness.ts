/**
 * What the benchmarks share: the MQTT load generator, the service and the
 * simulated engine started for a run, timing and memory figures.
 *
 * @module
 */

import mqtt from "mqtt";
import type { SimulatorOptions } from "../../lib/engine/simulator.ts";
import {
  freePort,
  removeTempDir,
  ROOT,
  type ServiceProcess,
  startMosquitto,
  startService,
  tempDir,
} from "../_helpers.ts";

export { startMosquitto };

interface Timings {
  readonly total: number[];
  readonly firstDelta: number[];
}

export interface Summary {
  readonly rps: number;
  readonly p50: number;
  readonly p95: number;
  readonly p99: number;
  readonly ttfd_p50: number | null;
}

export const percentile = (values: number[], q: number) => {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
};
export const round = (value: number, digits = 1) => +value.toFixed(digits);

/** Runs `total` requests from `concurrency` loops; `one(i, loop)` resolves with its first-delta time. */
export async function drive(
  total: number,
  concurrency: number,
  one: (i: number, loop: number) => Promise<number | undefined>,
): Promise<Summary> {
  const timings: Timings = { total: [], firstDelta: [] };
  let next = 0;
  const started = performance.now();
  await Promise.all(Array.from({ length: concurrency }, async (_, loop) => {
    while (next < total) {
      const i = next++;
      const t = performance.now();
      const firstDeltaAt = await one(i, loop);
      timings.total.push(performance.now() - t);
      if (firstDeltaAt !== undefined) timings.firstDelta.push(firstDeltaAt - t);
    }
  }));
  const seconds = (performance.now() - started) / 1000;
  return {
    rps: timings.total.length / seconds,
    p50: percentile(timings.total, 0.5),
    p95: percentile(timings.total, 0.95),
    p99: percentile(timings.total, 0.99),
    ttfd_p50: timings.firstDelta.length ? percentile(timings.firstDelta, 0.5) : null,
  };
}

/** Peak and current resident memory of a process, in MB (from /proc). */
export function memoryMb(pid: number): { peak: number; now: number } {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  const kb = (field: string) => Number(status.match(new RegExp(`${field}:\\s+(\\d+)`))?.[1] ?? 0);
  return { peak: round(kb("VmHWM") / 1024), now: round(kb("VmRSS") / 1024) };
}

/** The simulated engine, running on a thread of its own. */
export interface Simulator {
  readonly url: string;
  close(): Promise<void>;
}

/**
 * Starts the simulated engine in a Web Worker (as `--engine sim` does): its
 * token timers must not wait on the load generator's MQTT work, as a real
 * engine, in its own process, would not.
 */
export async function startSimulator(options: SimulatorOptions): Promise<Simulator> {
  const worker = new Worker(new URL("../../lib/engine/simulator_worker.ts", import.meta.url), {
    type: "module",
  });
  const url = await new Promise<string>((resolve) => {
    worker.onmessage = (event: MessageEvent<{ url: string }>) => resolve(event.data.url);
    worker.postMessage(options);
  });
  return {
    url,
    close: () => Promise.resolve(worker.terminate()),
  };
}

/** How one request ended (`done` or the error code), and when its first delta came. */
export interface Answer {
  done: () => void;
  outcome: string;
  firstDelta?: number;
}

/**
 * MQTT load generator: `connections` clients; each request waits for its own
 * `done` (or `error`) and reports when its first delta arrived.
 */
export class Load {
  readonly #clients: mqtt.MqttClient[];
  readonly #pending = new Map<string, Answer>();
  readonly #subscribed = new Set<string>();

  private constructor(clients: mqtt.MqttClient[]) {
    this.#clients = clients;
    for (const client of clients) {
      client.on("message", (_topic, payload) => {
        const reply = JSON.parse(new TextDecoder().decode(payload));
        const waiting = this.#pending.get(reply.request_id);
        if (!waiting) return;
        if (reply.type === "delta") waiting.firstDelta ??= performance.now();
        if (reply.type === "done" || reply.type === "error") {
          waiting.outcome = reply.type === "done" ? "done" : reply.error.code;
          waiting.done();
        }
      });
    }
  }

  static async open(url: string, connections: number): Promise<Load> {
    const clients = await Promise.all(
      Array.from({ length: connections }, () => mqtt.connectAsync(url, { reconnectPeriod: 0 })),
    );
    // The load generator's sockets, like the service's, must not wait on Nagle.
    for (const client of clients) {
      (client.stream as unknown as { setNoDelay?: (on: boolean) => void }).setNoDelay?.(true);
    }
    return new Load(clients);
  }

  /**
   * Subscribes, before any timing starts, to the reply topics of the
   * requests `ask` will send: request `index` of session `sessionId` each.
   */
  async prepare(requests: readonly (readonly [index: number, sessionId: string])[]): Promise<void> {
    const topics = this.#clients.map(() => [] as string[]);
    for (const [index, sessionId] of requests) {
      const topic = `general/assistant_response/${sessionId}`;
      if (this.#subscribed.has(topic)) continue;
      this.#subscribed.add(topic);
      topics[index % this.#clients.length].push(topic);
    }
    await Promise.all(this.#clients.map(async (client, k) => {
      for (let start = 0; start < topics[k].length; start += 500) {
        await client.subscribeAsync(topics[k].slice(start, start + 500), { qos: 1 });
      }
    }));
  }

  /**
   * Sends request `index` (on connection `index` modulo their number) and
   * resolves when it is answered, with its first-delta time.
   */
  async ask(
    index: number,
    sessionId: string,
    requestId: string,
    message: string,
    fields: Record<string, unknown> = {},
  ): Promise<Answer> {
    const client = this.#clients[index % this.#clients.length];
    await this.prepare([[index, sessionId]]);
    return await new Promise((resolve) => {
      const entry: Answer = {
        outcome: "",
        done: () => {
          this.#pending.delete(requestId);
          resolve(entry);
        },
      };
      this.#pending.set(requestId, entry);
      client.publish(
        "general/user_input",
        JSON.stringify({ session_id: sessionId, message, request_id: requestId, ...fields }),
        { qos: 1 },
      );
    });
  }

  async close(): Promise<void> {
    await Promise.all(this.#clients.map((client) => client.endAsync(true)));
  }
}

/** The `--v8-flags=...` of the `start` task in the `deno.json` of checkout `root`. */
function startTaskV8Flags(root: string): string[] {
  const config = JSON.parse(Deno.readTextFileSync(`${root}deno.json`));
  return String(config.tasks?.start ?? "").split(/\s+/).filter((flag) =>
    flag.startsWith("--v8-flags=")
  );
}

export interface Running {
  readonly sim: Simulator;
  readonly service: ServiceProcess;
  readonly load: Load;
  readonly httpPort: number;
  stop(): Promise<void>;
}

/**
 * Starts the service (`main.ts`, the permissions `deno task start` grants) on
 * the engine `sim` and the broker at `brokerUrl`, with `args` after the bench's
 * own flags, and opens `connections` load generator clients.
 * The V8 flags of the checkout's `deno task start` are passed too, so that the
 * service runs as that task runs it. `BENCH_DENO_FLAGS` adds flags to
 * `deno run` (e.g. `--cpu-prof --cpu-prof-dir=prof` to profile a run). `root`
 * runs another checkout's service (the CPU bench compares two).
 */
export async function run(
  brokerUrl: string,
  sim: Simulator,
  args: string[],
  connections: number,
  root?: string,
): Promise<Running> {
  const dataDir = await tempDir("vllm-mqtt-bench-");
  const httpPort = freePort();
  const denoFlags = [
    ...startTaskV8Flags(root ?? ROOT),
    ...(Deno.env.get("BENCH_DENO_FLAGS") ?? "").split(/\s+/).filter(Boolean),
  ];
  const service = await startService([
    "--engine=url",
    `--engine-url=${sim.url}`,
    `--mqtt-url=${brokerUrl}`,
    `--data-dir=${dataDir}`,
    "--projects=general",
    "--max-model-len=32768",
    `--http-port=${httpPort}`,
    `--mqtt-client-id=bench-${crypto.randomUUID()}`,
    // The load generator sends far faster than any person: no rate limits.
    "--rate-limit=0",
    "--rate-limit-client=0",
    ...args,
  ], { denoFlags, root });
  const load = await Load.open(brokerUrl, connections);
  return {
    sim,
    service,
    load,
    httpPort,
    async stop() {
      await load.close();
      await service.stop();
      await sim.close();
      await removeTempDir(dataDir);
    },
  };
}
