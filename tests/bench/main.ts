/**
 * `deno task bench`: the bridge against the engine it fronts, in one run.
 *
 * (a), (b): the same requests go (1) through mosquitto and the service from
 * many MQTT connections and (2) straight to the same simulated engine with the
 * `openai` client, at the same concurrency; throughput, time to first delta
 * and latency percentiles are compared. (c): multi-turn sessions near their
 * history budget, trimmed to the low-water mark versus one turn at a time,
 * with the engine's prefix cache hit rate and time to first token. (d): 10,000
 * live sessions and the service's memory. Prints tables and writes
 * `bench-results.json`.
 */

import mqtt from "mqtt";
import OpenAI from "openai";
import type { SimulatorOptions } from "../../lib/engine/simulator.ts";
import { freePort, startMosquitto, startService } from "../_helpers.ts";

interface Timings {
  readonly total: number[];
  readonly firstDelta: number[];
}

interface Summary {
  readonly rps: number;
  readonly p50: number;
  readonly p95: number;
  readonly p99: number;
  readonly ttfd_p50: number | null;
}

const percentile = (values: number[], q: number) => {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
};
const round = (value: number, digits = 1) => +value.toFixed(digits);

/** Runs `total` requests from `concurrency` loops; `one(i, loop)` resolves with its first-delta time. */
async function drive(
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
function memoryMb(pid: number): { peak: number; now: number } {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  const kb = (field: string) => Number(status.match(new RegExp(`${field}:\\s+(\\d+)`))?.[1] ?? 0);
  return { peak: round(kb("VmHWM") / 1024), now: round(kb("VmRSS") / 1024) };
}

/** The simulated engine, running on a thread of its own. */
interface Simulator {
  readonly url: string;
  close(): Promise<void>;
}

/**
 * Starts the simulated engine in a Web Worker (as `--engine sim` does): its
 * token timers must not wait on the load generator's MQTT work, as a real
 * engine, in its own process, would not.
 */
async function startSimulator(options: SimulatorOptions): Promise<Simulator> {
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

/** Prometheus counters of the simulated engine. */
async function engineCounters(sim: Simulator): Promise<Record<string, number>> {
  const text = await (await fetch(sim.url.replace(/\/v1$/, "/metrics"))).text();
  const counters: Record<string, number> = {};
  for (const [, name, value] of text.matchAll(/^vllm:(\w+)\{[^}]*\} (\S+)$/gm)) {
    counters[name] = Number(value);
  }
  return counters;
}

/** How one request ended (`done` or the error code), and when its first delta came. */
interface Answer {
  done: () => void;
  outcome: string;
  firstDelta?: number;
}

/**
 * MQTT load generator: `connections` clients; each request waits for its own
 * `done` (or `error`) and reports when its first delta arrived.
 */
class Load {
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
        JSON.stringify({ session_id: sessionId, message, request_id: requestId }),
        { qos: 1 },
      );
    });
  }

  async close(): Promise<void> {
    await Promise.all(this.#clients.map((client) => client.endAsync(true)));
  }
}

interface Running {
  readonly sim: Simulator;
  readonly service: Awaited<ReturnType<typeof startService>>;
  readonly load: Load;
  readonly httpPort: number;
  stop(): Promise<void>;
}

async function run(
  brokerUrl: string,
  sim: Simulator,
  args: string[],
  connections: number,
): Promise<Running> {
  const dataDir = await Deno.makeTempDir({ prefix: "vllm-mqtt-bench-" });
  const httpPort = freePort();
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
  ]);
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
      await Deno.remove(dataDir, { recursive: true }).catch(() => {});
    },
  };
}

/** The system prompt the service sends for project `general`, sent by the direct client too. */
const GENERAL_PROMPT =
  (await Deno.readTextFile(new URL("../../prompts/general.md", import.meta.url)))
    .trim();
const broker = await startMosquitto();
const results: Record<string, unknown> = {};

// (a), (b): bridge against direct.
const throughputScenarios = [
  {
    name: "(a) zero-latency engine",
    sim: { ttftMs: 0, itlMs: 0, fillerTokens: 0 },
    runs: [{ concurrency: 1, total: 400 }, { concurrency: 16, total: 2000 }, {
      concurrency: 256,
      total: 4000,
    }],
  },
  {
    name: "(b) realistic engine: 50 ms + 15 ms/token, 64 tokens",
    sim: { ttftMs: 50, itlMs: 15, fillerTokens: 56 },
    runs: [{ concurrency: 1, total: 20 }, { concurrency: 64, total: 256 }, {
      concurrency: 256,
      total: 768,
    }],
  },
];
const throughputRows: Record<string, unknown>[] = [];
for (const scenario of throughputScenarios) {
  for (const { concurrency, total } of scenario.runs) {
    const sim = await startSimulator({ ...scenario.sim, maxModelLen: 32768 });
    const bench = await run(broker.url, sim, [
      "--max-history-tokens=1000",
      `--max-in-flight=${Math.max(256, concurrency)}`,
    ], Math.min(concurrency, 32));
    const tag = `${concurrency}-${crypto.randomUUID().slice(0, 8)}`;
    // The same requests both ways: one message to a new session, so that the engine sees the
    // same prompt from the bridge as from the direct client (history is scenario (c)'s matter).
    const session = (i: number) => `s${i}-${tag}`;
    await bench.load.prepare(Array.from({ length: total }, (_, i) => [i, session(i)] as const));
    let bridgeErrors = 0;
    const bridge = await drive(total, concurrency, async (i) => {
      const { firstDelta, outcome } = await bench.load.ask(
        i,
        session(i),
        `${tag}-${i}`,
        `hello ${i}`,
      );
      if (outcome !== "done") bridgeErrors++;
      return firstDelta;
    });
    const memory = memoryMb(bench.service.child.pid);
    const openai = new OpenAI({ baseURL: sim.url, apiKey: "bench", maxRetries: 0 });
    const direct = await drive(total, concurrency, async (i) => {
      const stream = await openai.chat.completions.create({
        model: "sim-model",
        messages: [
          { role: "system", content: GENERAL_PROMPT },
          { role: "user", content: `hello ${i}` },
        ],
        stream: true,
        max_tokens: 512,
      });
      let first: number | undefined;
      for await (const chunk of stream) {
        if (chunk.choices[0]?.delta?.content) first ??= performance.now();
      }
      return first;
    });
    await bench.stop();
    const row = {
      scenario: scenario.name,
      concurrency,
      requests: total,
      bridge_errors: bridgeErrors,
      bridge_rps: round(bridge.rps),
      direct_rps: round(direct.rps),
      throughput_ratio: round(bridge.rps / direct.rps, 3),
      bridge_p50_ms: round(bridge.p50),
      direct_p50_ms: round(direct.p50),
      added_p50_ms: round(bridge.p50 - direct.p50),
      bridge_p95_ms: round(bridge.p95),
      bridge_p99_ms: round(bridge.p99),
      added_ttfd_p50_ms: bridge.ttfd_p50 === null || direct.ttfd_p50 === null
        ? null
        : round(bridge.ttfd_p50 - direct.ttfd_p50),
      service_peak_rss_mb: memory.peak,
    };
    throughputRows.push(row);
    console.log(JSON.stringify(row));
  }
}
results.throughput = throughputRows;

// (c): sessions whose history sits near its budget; trimming strategies compared.
const trimRows: Record<string, unknown>[] = [];
for (
  const [strategy, lowWater] of [["drop to low water (0.6)", "0.6"], ["drop one turn", "1"]]
) {
  const sim = await startSimulator({
    ttftMs: 10,
    itlMs: 1,
    fillerTokens: 30,
    prefillMsPerToken: 0.2,
    maxModelLen: 32768,
  });
  const sessions = 16;
  const turns = 40;
  const bench = await run(broker.url, sim, [
    "--max-history-tokens=1200",
    `--trim-low-water=${lowWater}`,
  ], sessions);
  const before = await engineCounters(sim);
  const ttfts: number[] = [];
  const tag = crypto.randomUUID().slice(0, 8);
  await Promise.all(Array.from({ length: sessions }, async (_, s) => {
    for (let turn = 0; turn < turns; turn++) {
      const started = performance.now();
      // Each session its own words, so that only its own earlier turns can be cached.
      const text = `Player ${s}, move ${turn}: which way now that the corridor splits in three?`;
      const { firstDelta } = await bench.load.ask(s, `c${s}-${tag}`, `c${s}-${turn}-${tag}`, text);
      if (firstDelta !== undefined && turn >= 10) ttfts.push(firstDelta - started);
    }
  }));
  const after = await engineCounters(sim);
  await bench.stop();
  const hits = after.prefix_cache_hits_total - before.prefix_cache_hits_total;
  const queries = after.prefix_cache_queries_total - before.prefix_cache_queries_total;
  const row = {
    strategy,
    sessions,
    turns,
    cache_hit_rate: round(hits / queries, 3),
    ttfd_p50_ms: round(percentile(ttfts, 0.5)),
    ttfd_p95_ms: round(percentile(ttfts, 0.95)),
  };
  trimRows.push(row);
  console.log(JSON.stringify(row));
}
results.trimming = trimRows;

// (d): 10,000 live sessions.
{
  const sim = await startSimulator({ ttftMs: 0, itlMs: 0, maxModelLen: 32768 });
  const bench = await run(broker.url, sim, ["--max-sessions=20000"], 32);
  const before = memoryMb(bench.service.child.pid);
  const sessions = 10_000;
  const tag = crypto.randomUUID().slice(0, 8);
  await bench.load.prepare(
    Array.from({ length: sessions }, (_, i) => [i, `d${i}-${tag}`] as const),
  );
  const summary = await drive(sessions, 256, async (i) => {
    await bench.load.ask(i, `d${i}-${tag}`, `d${i}-${tag}`, `hello ${i}`);
    return undefined;
  });
  const status = await (await fetch(`http://127.0.0.1:${bench.httpPort}/status`)).json();
  const memory = memoryMb(bench.service.child.pid);
  // Then the sessions only: V8 gives back the heap the burst grew after some idle seconds.
  let settled = memory.now;
  for (let waited = 0; waited < 30; waited += 2) {
    await new Promise((resolve) => setTimeout(resolve, 2000));
    settled = memoryMb(bench.service.child.pid).now;
  }
  await bench.stop();
  const row = {
    sessions,
    live_sessions: status.live_sessions,
    rps: round(summary.rps),
    service_rss_before_mb: before.now,
    service_rss_after_load_mb: memory.now,
    service_rss_settled_mb: settled,
    service_peak_rss_mb: memory.peak,
  };
  results.sessions = row;
  console.log(JSON.stringify(row));
}
// (e): a flood 50 times the queue, against a slow engine.
{
  const sim = await startSimulator({ ttftMs: 200, itlMs: 5, maxModelLen: 32768 });
  const bench = await run(broker.url, sim, [
    "--max-queue=200",
    "--max-in-flight=64",
  ], 8);
  const flood = 10_000;
  const tag = crypto.randomUUID().slice(0, 8);
  const outcomes: Record<string, number> = {};
  const rejectedIn: number[] = [];
  await bench.load.prepare(Array.from({ length: flood }, (_, i) => [i, `e${i}-${tag}`] as const));
  const started = performance.now();
  await Promise.all(Array.from({ length: flood }, async (_, i) => {
    const t = performance.now();
    const { outcome } = await bench.load.ask(i, `e${i}-${tag}`, `e${i}-${tag}`, "flood");
    outcomes[outcome] = (outcomes[outcome] ?? 0) + 1;
    if (outcome === "queue_full") rejectedIn.push(performance.now() - t);
  }));
  const memory = memoryMb(bench.service.child.pid);
  await bench.stop();
  const row = {
    flood,
    queue: 200,
    answered: outcomes.done ?? 0,
    queue_full: outcomes.queue_full ?? 0,
    other: flood - (outcomes.done ?? 0) - (outcomes.queue_full ?? 0),
    queue_full_p50_ms: round(percentile(rejectedIn, 0.5)),
    seconds: round((performance.now() - started) / 1000),
    service_peak_rss_mb: memory.peak,
  };
  results.flood = row;
  console.log(JSON.stringify(row));
}
await broker.stop();

console.log(
  "\n(a), (b) bridge against direct (targets: ratio >= 0.97 at 64 and 256 with the realistic",
);
console.log(
  "engine, added p50 <= 2 ms, added time to first delta <= 1 ms, >= 2000 req/s zero-latency)",
);
console.table(throughputRows);
console.log("(c) trimming near the budget (target: low water beats one turn on hit rate and TTFD)");
console.table(trimRows);
console.log("(d) 10,000 live sessions (target: service RSS under 300 MB)");
console.table([results.sessions]);
console.log("(e) a flood 50 times the queue (queue_full quickly; accepted requests finish)");
console.table([results.flood]);
await Deno.writeTextFile("bench-results.json", JSON.stringify(results, null, 2));
