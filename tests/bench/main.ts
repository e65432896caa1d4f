/**
 * `deno task bench`: the bridge against the engine it fronts, in one run.
 * For each scenario it sends the same requests (a) through mosquitto and the
 * service and (b) straight to the same simulated engine with the `openai`
 * client, at the same concurrency, and prints throughput and latency ratios.
 * Writes `bench-results.json`.
 */

import OpenAI from "openai";
import { startSimulator } from "../../lib/engine/simulator.ts";
import { startMosquitto, startService, TestClient } from "../_helpers.ts";

interface Result {
  readonly rps: number;
  readonly p50: number;
  readonly p95: number;
}

const percentile = (sorted: number[], q: number) =>
  sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
const summarize = (latencies: number[], seconds: number): Result => {
  const sorted = latencies.sort((a, b) => a - b);
  return {
    rps: latencies.length / seconds,
    p50: percentile(sorted, 0.5),
    p95: percentile(sorted, 0.95),
  };
};

/** Runs `total` requests with `concurrency` workers; `one(i)` sends request i and resolves when answered. */
async function drive(
  total: number,
  concurrency: number,
  one: (i: number) => Promise<void>,
): Promise<Result> {
  const latencies: number[] = [];
  let next = 0;
  const started = performance.now();
  await Promise.all(Array.from({ length: concurrency }, async () => {
    while (next < total) {
      const i = next++;
      const t = performance.now();
      await one(i);
      latencies.push(performance.now() - t);
    }
  }));
  return summarize(latencies, (performance.now() - started) / 1000);
}

const scenarios = [
  {
    name: "zero-latency engine",
    ttftMs: 0,
    itlMs: 0,
    filler: 0,
    concurrency: [1, 16],
    rounds: 200,
  },
  {
    name: "realistic engine (50 ms + 15 ms/token, 64 tokens)",
    ttftMs: 50,
    itlMs: 15,
    filler: 56,
    concurrency: [1, 64],
    rounds: 4,
  },
];

const broker = await startMosquitto();
const rows: Record<string, unknown>[] = [];
for (const scenario of scenarios) {
  const sim = await startSimulator({
    ttftMs: scenario.ttftMs,
    itlMs: scenario.itlMs,
    fillerTokens: scenario.filler,
    maxModelLen: 32768,
  });
  const dataDir = await Deno.makeTempDir();
  const service = await startService([
    "--engine=url",
    `--engine-url=${sim.url}`,
    `--mqtt-url=${broker.url}`,
    `--data-dir=${dataDir}`,
    "--projects=general",

    "--max-history-tokens=1000",
    "--max-model-len=32768",
    `--mqtt-client-id=bench-${crypto.randomUUID()}`,
  ]);
  const client = await TestClient.connect(broker.url);
  await client.subscribe("general/assistant_response/#");
  const pending = new Map<string, () => void>();
  client.client.on("message", (_topic, payload) => {
    const reply = JSON.parse(new TextDecoder().decode(payload));
    if (reply.type === "done" || reply.type === "error") pending.get(reply.request_id)?.();
  });
  const openai = new OpenAI({ baseURL: sim.url, apiKey: "bench", maxRetries: 0 });
  for (const concurrency of scenario.concurrency) {
    const tag = `${scenario.ttftMs}-${concurrency}`;
    const total = Math.max(16, concurrency * scenario.rounds);
    const bridge = await drive(total, concurrency, (i) =>
      new Promise<void>((resolve) => {
        const id = `${tag}-${i}`;
        pending.set(id, () => {
          pending.delete(id);
          resolve();
        });
        client.send("general/user_input", {
          session_id: `s${i % concurrency}-${tag}`,
          message: `hello ${i}`,
          request_id: id,
        });
      }));
    const direct = await drive(total, concurrency, async (i) => {
      const stream = await openai.chat.completions.create({
        model: "sim-model",
        messages: [{ role: "system", content: "You are a helpful assistant." }, {
          role: "user",
          content: `hello ${i}`,
        }],
        stream: true,
        max_tokens: 512,
      });
      for await (const _ of stream) { /* consume */ }
    });
    const row = {
      scenario: scenario.name,
      concurrency,
      bridge_rps: +bridge.rps.toFixed(1),
      direct_rps: +direct.rps.toFixed(1),
      throughput_ratio: +(bridge.rps / direct.rps).toFixed(3),
      bridge_p50_ms: +bridge.p50.toFixed(1),
      direct_p50_ms: +direct.p50.toFixed(1),
      added_p50_ms: +(bridge.p50 - direct.p50).toFixed(1),
      bridge_p95_ms: +bridge.p95.toFixed(1),
    };
    rows.push(row);
    console.log(JSON.stringify(row));
  }
  await client.close();
  await service.stop();
  await sim.close();
}
await broker.stop();
console.table(rows);
await Deno.writeTextFile("bench-results.json", JSON.stringify(rows, null, 2));
