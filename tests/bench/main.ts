/**
 * `deno task bench`: the bridge against the engine it fronts, in one run.
 *
 * (a), (b): the same requests go (1) through mosquitto and the service from
 * many MQTT connections and (2) straight to the same simulated engine with the
 * `openai` client, at the same concurrency; throughput, time to first delta
 * and latency percentiles are compared. (c): multi-turn sessions near their
 * history budget, trimmed to the low-water mark versus one turn at a time,
 * with the engine's prefix cache hit rate and time to first token. (d): 10,000
 * live sessions and the service's memory. First, and printed first: the
 * service's CPU time per answered request and per streamed token, with the
 * baselines' per token (`cpu.ts`). Prints tables and writes
 * `bench-results.json`; `--only=cpu` measures the CPU figures alone.
 */

import OpenAI from "openai";
import {
  drive,
  memoryMb,
  percentile,
  round,
  run,
  type Simulator,
  startMosquitto,
  startSimulator,
} from "./harness.ts";
import { COMPARE_ROOTS, cpuBench, cpuTable, REPEATS } from "./cpu.ts";
import { burstBench, type BurstRow } from "./burst.ts";
import { decisionCost, routingBench } from "./routing.ts";

/** Prometheus counters of the simulated engine. */
async function engineCounters(sim: Simulator): Promise<Record<string, number>> {
  const text = await (await fetch(sim.url.replace(/\/v1$/, "/metrics"))).text();
  const counters: Record<string, number> = {};
  for (const [, name, value] of text.matchAll(/^vllm:(\w+)\{[^}]*\} (\S+)$/gm)) {
    counters[name] = Number(value);
  }
  return counters;
}

/** The system prompt the service sends for project `general`, sent by the direct client too. */
const GENERAL_PROMPT =
  (await Deno.readTextFile(new URL("../../prompts/general.md", import.meta.url)))
    .trim();
const broker = await startMosquitto();
const results: Record<string, unknown> = {};
/**
 * `--only=cpu`: the CPU table alone (a few minutes, not eight); `--only=tokens`,
 * `--only=paced` or `--only=requests`: its per-token, paced per-token or
 * per-request rows alone; `--only=burst`: (d) alone, {@linkcode REPEATS} times,
 * each time also for each of `BENCH_COMPARE`'s checkouts, with the medians;
 * `--only=routing`: (f) alone, the routing policies over four engines (`routing.ts`).
 */
const ROUTING_TITLE =
  "(f) four engines, routing policies (goals: cache-aware's hit rate >= consistent-hash's with " +
  "imbalance <= 1.2; its p95 TTFT <= 0.7x the best baseline's; 0 lost turns; times 10x faster than life)";
const COST_TITLE =
  "the router's CPU time a turn (route, started, prefilled, finished), by engines and policy";
const only = Deno.args.find((arg) => arg.startsWith("--only="))?.slice("--only=".length);
const cpuOnly = ["cpu", "tokens", "paced", "requests"].includes(only ?? "");

if (only === "burst") {
  // Each checkout's bursts in turn, so that what else the machine does falls on all of them alike.
  const runs: Record<string, BurstRow[]> = {};
  for (let repeat = 0; repeat < REPEATS; repeat++) {
    for (const root of [undefined, ...COMPARE_ROOTS]) {
      const row = await burstBench(broker.url, root);
      (runs[root ?? "service"] ??= []).push(row);
      console.log(JSON.stringify({ service: root ?? "service", ...row }));
    }
  }
  const median = (values: number[]) => values.toSorted((a, b) => a - b)[values.length >> 1];
  const medians = Object.entries(runs).map(([service, rows]) => ({
    service,
    ...Object.fromEntries(
      Object.keys(rows[0]).map((key) => [
        key,
        median(rows.map((row) => row[key as keyof BurstRow])),
      ]),
    ),
  }));
  await broker.stop();
  console.log(`(d) 10,000 live sessions, the median of ${REPEATS} runs each`);
  console.table(medians);
  await Deno.writeTextFile("bench-results.json", JSON.stringify({ sessions: runs }, null, 2));
  Deno.exit(0);
}

if (only === "routing") {
  await broker.stop();
  const rows = await routingBench();
  const cost = decisionCost();
  console.log(ROUTING_TITLE);
  console.table(rows);
  console.log(COST_TITLE);
  console.table(cost);
  await Deno.writeTextFile(
    "bench-results.json",
    JSON.stringify({ routing: rows, routing_cost: cost }, null, 2),
  );
  Deno.exit(0);
}

// The bridge's own cost in CPU time, first: it does not depend on who else gets the cores.
const cpu = await cpuBench(
  broker.url,
  GENERAL_PROMPT,
  only === "tokens" || only === "paced" || only === "requests" ? only : undefined,
);
results.cpu = cpu;
console.log(JSON.stringify(cpu));

const throughputRows: Record<string, unknown>[] = [];
const trimRows: Record<string, unknown>[] = [];
if (!cpuOnly) {
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
        const { firstDelta } = await bench.load.ask(
          s,
          `c${s}-${tag}`,
          `c${s}-${turn}-${tag}`,
          text,
        );
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
  results.sessions = await burstBench(broker.url);
  console.log(JSON.stringify(results.sessions));
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
  // (f): several engines, the routing policies side by side.
  results.routing = await routingBench();
  results.routing_cost = decisionCost();
}
await broker.stop();

console.log(
  "\nCPU time of the service (from /proc/PID/stat, all threads; the median of each figure's runs)",
);
console.log("and of the baselines reading the same streams, each in a process of its own:");
console.table(cpuTable(cpu));
if (!cpuOnly) {
  console.log(
    "\n(a), (b) bridge against direct (targets: ratio >= 0.97 at 64 and 256 with the realistic",
  );
  console.log(
    "engine, added p50 <= 2 ms, added time to first delta <= 1 ms, >= 2000 req/s zero-latency)",
  );
  console.table(throughputRows);
  console.log(
    "(c) trimming near the budget (target: low water beats one turn on hit rate and TTFD)",
  );
  console.table(trimRows);
  console.log("(d) 10,000 live sessions (goal: peak RSS <= 350 MB)");
  console.table([results.sessions]);
  console.log("(e) a flood 50 times the queue (queue_full quickly; accepted requests finish)");
  console.table([results.flood]);
  console.log(ROUTING_TITLE);
  console.table(results.routing);
  console.log(COST_TITLE);
  console.table(results.routing_cost);
}
await Deno.writeTextFile("bench-results.json", JSON.stringify(results, null, 2));
