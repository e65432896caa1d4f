/**
 * (f) Several engines behind one service (`--only=routing`): the routing
 * policies side by side, on the same workload, against four simulated
 * engines with prefix caches and a serialized prefill (the real simulator,
 * each in a Web Worker of its own, over HTTP) and the real router
 * (`lib/routing/router.ts`, fed by the real `/metrics` reader). The load
 * generator plays the service's part: it routes each turn, sends it, tells
 * the router when the first token came and how the turn ended, retries a
 * failed turn on another engine and takes an engine whose connection fails
 * as down (its circuit open).
 *
 * Time runs 10 times faster than in life: prefill at 0.1 ms a token here
 * stands for 1 ms (1,000 tokens a second: a large model on a GPU that also
 * decodes), think time of 2 s for 20 s, and "the 60 s after the kill" is the
 * 6 s after it.
 *
 * Workload: a fixed number of live sessions, each of 8 to 16 turns, then
 * replaced by a new one; four projects with system prompts of about 1,200
 * tokens; each user message about 400 tokens (pasted text), each answer
 * about 100 (decoded at 1 ms a token); four hot sessions that think a tenth
 * as long. Every policy gets the same sessions (a seeded generator) on fresh
 * engines.
 *
 * @module
 */

import { promptTokenIds, tokenIds } from "../../lib/engine/simulated_reply.ts";
import type { SimulatorOptions } from "../../lib/engine/simulator.ts";
import { sseData } from "../../lib/engine/sse.ts";
import { parseEngineLoad } from "../../lib/routing/engine_load.ts";
import {
  type RouteDecision,
  type RoutePolicy,
  Router,
  type TurnToRoute,
} from "../../lib/routing/router.ts";
import { percentile, round } from "./harness.ts";
import { seededRandom } from "../_random.ts";

/** How much faster than life the benchmark's clock runs. */
const TIME_SCALE = 10;
const POLICIES: readonly RoutePolicy[] =
  Deno.env.get("ROUTING_POLICIES")?.split(",") as RoutePolicy[] ?? [
    "round-robin",
    "least-loaded",
    "consistent-hash",
    "cache-aware",
  ];

/** One scenario: the engines and the sessions. */
interface Scenario {
  readonly name: string;
  /** Live sessions at any time, of which `hot` barely think. */
  readonly sessions: number;
  readonly hot: number;
  /** Mean think time between a session's turns, ms (hot sessions: a tenth). */
  readonly thinkMs: number;
  /** How long turns are started, ms. */
  readonly durationMs: number;
  /** KV cache of each engine, in blocks of 16 tokens. */
  readonly cacheBlocks: number;
  /** When engine e1 is killed, ms into the run. */
  readonly killAtMs?: number;
}

const SCENARIOS: readonly Scenario[] = [
  {
    name: "cache pressure",
    sessions: 64,
    hot: 4,
    thinkMs: 2000,
    durationMs: 15_000,
    cacheBlocks: 3200, // 51,200 tokens an engine: by the end, the live sessions fit in the four, barely
  },
  {
    name: "high load",
    sessions: 108,
    hot: 4,
    thinkMs: 2000,
    durationMs: 15_000,
    cacheBlocks: 65536,
  },
  {
    name: "engine killed",
    sessions: 56,
    hot: 4,
    thinkMs: 2000,
    durationMs: 16_000,
    cacheBlocks: 65536,
    killAtMs: 5000,
  },
];

const ENGINE: SimulatorOptions = {
  ttftMs: 2,
  itlMs: 1,
  fillerTokens: 20,
  prefillMsPerToken: 0.1,
  prefillQueue: true,
  maxModelLen: 65536,
};

/** A row of the routing table. */
export interface RoutingRow {
  readonly scenario: string;
  readonly policy: RoutePolicy;
  readonly turns: number;
  readonly turns_per_s: number;
  readonly hit_rate: number;
  readonly ttft_p50_ms: number;
  readonly ttft_p95_ms: number;
  readonly imbalance: number;
  /** The engines' mean share of the run spent prefilling. */
  readonly prefill_busy: number;
  readonly moves: number;
  readonly p95_after_kill_ms: number | null;
  readonly retried: number;
  readonly lost: number;
}

const SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "po", "de", "gu", "fa"];
const words = (next: () => number, count: number) =>
  Array.from(
    { length: count },
    () =>
      Array.from({ length: 2 + Math.floor(next() * 3) }, () =>
        SYLLABLES[Math.floor(next() * SYLLABLES.length)]).join(""),
  ).join(" ");

interface Engine {
  readonly id: string;
  readonly url: string;
  readonly worker: Worker;
  alive: boolean;
  hits: number;
  queries: number;
}

async function startEngine(id: string, cacheBlocks: number): Promise<Engine> {
  const worker = new Worker(
    new URL("../../lib/engine/simulator_worker.ts", import.meta.url),
    { type: "module" },
  );
  const url = await new Promise<string>((resolve) => {
    worker.onmessage = (event: MessageEvent<{ url: string }>) => resolve(event.data.url);
    worker.postMessage({ ...ENGINE, prefixCacheBlocks: cacheBlocks } satisfies SimulatorOptions);
  });
  return { id, url, worker, alive: true, hits: 0, queries: 0 };
}

type Message = { role: "system" | "user" | "assistant"; content: string };

/** The engine answered with an error status: it is up. */
class EngineRefusal extends Error {}

/** One policy through one scenario. */
async function runOne(scenario: Scenario, policy: RoutePolicy): Promise<RoutingRow> {
  const engines = await Promise.all(
    ["e0", "e1", "e2", "e3"].map((id) => startEngine(id, scenario.cacheBlocks)),
  );
  const byId = new Map(engines.map((engine) => [engine.id, engine]));
  const router = new Router(engines.map(({ id }) => ({ id, models: ["sim-model"] })), {
    policy,
    // Life's figures, scaled: 5 s of half-life, a margin of 50 ms.
    recentHalfLifeMs: 10_000 / TIME_SCALE,
    marginMs: 500 / TIME_SCALE,
    prefillTokensPerMs: 10,
  });
  const projects = Array.from({ length: 4 }, (_, p) => {
    const system = `# Project ${p}\n${words(seededRandom(1000 + p), 500)}`;
    return {
      name: `p${p}`,
      system,
      sharedTokens: promptTokenIds([{ role: "system", content: system }]).length - 3,
    };
  });

  const scrape = async () => {
    await Promise.all(
      engines.filter((e) => e.alive).map(async (engine) => {
        try {
          const load = parseEngineLoad(
            await (await fetch(engine.url.replace(/\/v1$/, "/metrics"))).text(),
          );
          router.observe(engine.id, load);
          engine.hits = load.prefixCacheHits ?? engine.hits;
          engine.queries = load.prefixCacheQueries ?? engine.queries;
        } catch {
          // Dead: its last counters stand.
        }
      }),
    );
  };
  const scraper = setInterval(scrape, 250);

  const ttfts: { at: number; ms: number }[] = [];
  let turns = 0;
  let retried = 0;
  let lost = 0;
  let lastDone = 0;
  const started = performance.now();
  const elapsed = () => performance.now() - started;

  /** Sends one attempt; resolves with the answer, or throws (with whether text had come). */
  const attempt = async (
    engine: Engine,
    messages: Message[],
    onFirst: () => void,
  ): Promise<{ text: string; promptTokens: number }> => {
    const response = await fetch(`${engine.url}/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        model: "sim-model",
        messages,
        stream: true,
        stream_options: { include_usage: true },
        max_tokens: 256,
      }),
    });
    if (!response.ok) {
      await response.body?.cancel();
      throw new EngineRefusal(`HTTP ${response.status}`);
    }
    let text = "";
    let promptTokens = 0;
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") break;
      const event = JSON.parse(data);
      const piece = event.choices?.[0]?.delta?.content;
      if (piece) {
        if (text === "") onFirst();
        text += piece;
      }
      if (event.usage) promptTokens = event.usage.prompt_tokens;
    }
    if (promptTokens === 0) throw new Error("stream cut before its usage");
    return { text, promptTokens };
  };

  /** One turn, retried elsewhere as the service retries it. */
  const runTurn = async (turn: TurnToRoute, messages: Message[]) => {
    const turnStart = performance.now();
    const startedAt = elapsed();
    const exclude = new Set<string>();
    for (let tries = 0; tries < 4; tries++) {
      const decision: RouteDecision | undefined = router.route(turn, exclude);
      if (!decision) break;
      const engine = byId.get(decision.engine)!;
      router.started(engine.id, decision);
      const sentAt = performance.now();
      let firstAt: number | undefined;
      try {
        const answer = await attempt(engine, messages, () => {
          firstAt = performance.now();
          router.prefilled(engine.id, decision);
        });
        router.finished(engine.id, decision, {
          ok: true,
          ttftMs: firstAt! - sentAt,
          promptTokens: answer.promptTokens,
        });
        ttfts.push({ at: startedAt, ms: firstAt! - turnStart });
        turns++;
        lastDone = elapsed();
        return answer;
      } catch (error) {
        router.finished(engine.id, decision, { ok: false });
        exclude.add(engine.id);
        // The connection refused or cut is the engine down (the service's circuit opens on it).
        if (!(error instanceof EngineRefusal)) router.setHealthy(engine.id, false);
        // Text had come: the client is told to retry, and does (the same turn, again).
        if (firstAt !== undefined) retried++;
      }
    }
    lost++;
    return undefined;
  };

  /** A slot of the population: sessions one after another until the time is up. */
  const slot = async (index: number) => {
    const next = seededRandom(index + 1);
    const hot = index < scenario.hot;
    const think = () => -Math.log(1 - next()) * scenario.thinkMs * (hot ? 0.1 : 1);
    await new Promise((resolve) => setTimeout(resolve, next() * scenario.thinkMs));
    for (let generation = 0; elapsed() < scenario.durationMs; generation++) {
      const project = projects[Math.floor(next() * projects.length)];
      const key = `${project.name}/s${index}-${generation}`;
      const messages: Message[] = [{ role: "system", content: project.system }];
      let prefixTokens = 0;
      const length = 8 + Math.floor(next() * 9);
      for (let n = 0; n < length && elapsed() < scenario.durationMs; n++) {
        messages.push({ role: "user", content: words(next, 170) });
        const turn: TurnToRoute = {
          key,
          model: "sim-model",
          promptTokens: promptTokenIds(messages).length,
          prefixTokens,
          sharedPrefixTokens: project.sharedTokens,
        };
        const answer = await runTurn(turn, messages);
        if (!answer) break;
        messages.push({ role: "assistant", content: answer.text });
        prefixTokens = answer.promptTokens;
        await new Promise((resolve) => setTimeout(resolve, think()));
      }
    }
  };

  let killedAt: number | undefined;
  const killer = scenario.killAtMs === undefined ? undefined : setTimeout(() => {
    const victim = byId.get("e1")!;
    victim.alive = false;
    victim.worker.terminate();
    killedAt = elapsed();
  }, scenario.killAtMs);

  await Promise.all(Array.from({ length: scenario.sessions }, (_, i) => slot(i)));
  clearTimeout(killer);
  clearInterval(scraper);
  await scrape();
  for (const engine of engines) if (engine.alive) engine.worker.terminate();

  const survivors = engines.filter((e) => e.alive);
  const uncached = survivors.map((e) => e.queries - e.hits);
  const mean = uncached.reduce((a, b) => a + b, 0) / uncached.length;
  const hits = engines.reduce((sum, e) => sum + e.hits, 0);
  const queries = engines.reduce((sum, e) => sum + e.queries, 0);
  const afterKill = killedAt === undefined
    ? []
    : ttfts.filter(({ at }) => at >= killedAt! && at < killedAt! + 60_000 / TIME_SCALE);
  const moves = router.snapshot().engines.reduce(
    (sum, e) => sum + e.decisions.moved_for_load + e.decisions.rehomed,
    0,
  );
  const ms = ttfts.map(({ ms }) => ms);
  return {
    scenario: scenario.name,
    policy,
    turns,
    turns_per_s: round(turns / (lastDone / 1000)),
    hit_rate: round(hits / queries, 3),
    ttft_p50_ms: round(percentile(ms, 0.5)),
    ttft_p95_ms: round(percentile(ms, 0.95)),
    imbalance: round(Math.max(...uncached) / mean, 2),
    prefill_busy: round(mean * ENGINE.prefillMsPerToken! / lastDone, 2),
    moves,
    p95_after_kill_ms: afterKill.length
      ? round(percentile(afterKill.map(({ ms }) => ms), 0.95))
      : null,
    retried,
    lost,
  };
}

/** CPU time of the router's part of a turn (route, started, prefilled, finished), by engines. */
export interface DecisionCostRow {
  readonly engines: number;
  readonly policy: RoutePolicy;
  readonly us_per_turn: number;
}

/**
 * What the router costs a turn as engines are added: 20,000 turns of 2,000 sessions through each
 * policy with 4, 16 and 64 engines, on one thread, no I/O (the median of 3 runs each).
 */
export function decisionCost(): DecisionCostRow[] {
  const rows: DecisionCostRow[] = [];
  for (const count of [4, 16, 64]) {
    const slots = Array.from({ length: count }, (_, i) => ({ id: `e${i}`, models: ["m"] }));
    for (const policy of POLICIES) {
      const runs: number[] = [];
      for (let run = 0; run < 3; run++) {
        const router = new Router(slots, { policy });
        const turns = 20_000;
        const started = performance.now();
        for (let i = 0; i < turns; i++) {
          const n = Math.floor(i / 2000);
          const decision = router.route({
            key: `p${i % 4}/s${i % 2000}`,
            model: "m",
            promptTokens: 1200 + 500 * (n + 1),
            prefixTokens: n === 0 ? 0 : 1200 + 500 * n,
            sharedPrefixTokens: 1200,
          })!;
          router.started(decision.engine, decision);
          router.prefilled(decision.engine, decision);
          router.finished(decision.engine, decision, { ok: true, ttftMs: 50 });
        }
        runs.push((performance.now() - started) * 1000 / turns);
      }
      rows.push({
        engines: count,
        policy,
        us_per_turn: round(runs.toSorted((a, b) => a - b)[1], 2),
      });
    }
  }
  return rows;
}

/** Every scenario, every policy in turn; `scenarios` and `policies` pick some. */
export async function routingBench(
  scenarios?: readonly string[],
  policies: readonly RoutePolicy[] = POLICIES,
): Promise<RoutingRow[]> {
  // Loads the tokenizer before the clock runs.
  tokenIds("warm up");
  const rows: RoutingRow[] = [];
  for (const scenario of SCENARIOS) {
    if (scenarios && !scenarios.includes(scenario.name)) continue;
    for (const policy of policies) {
      const row = await runOne(scenario, policy);
      rows.push(row);
      console.log(JSON.stringify(row));
    }
  }
  return rows;
}
