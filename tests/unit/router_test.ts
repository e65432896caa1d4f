/** The router (lib/routing/router.ts) and the reading of vLLM's /metrics (engine_load.ts). */

import { deepEqual, equal, ok, throws } from "node:assert/strict";
import { parseEngineLoad } from "../../lib/routing/engine_load.ts";
import { RouteLedger } from "../../lib/routing/route_ledger.ts";
import {
  type RouteDecision,
  type RoutePolicy,
  Router,
  type RouterOptions,
  type TurnToRoute,
} from "../../lib/routing/router.ts";

const FOUR = ["e0", "e1", "e2", "e3"].map((id) => ({ id, models: ["m"] }));

/** A router on an injected clock. */
function router(policy: RoutePolicy, options: RouterOptions = {}, engines = FOUR) {
  const clock = { now: 0 };
  return { router: new Router(engines, { policy, now: () => clock.now, ...options }), clock };
}

/** Routes a turn, starts it and (unless `keep`) finishes it with a first token after `ttftMs`. */
function turn(r: Router, t: TurnToRoute, keep = false): RouteDecision {
  const decision = r.route(t)!;
  r.started(decision.engine, decision);
  if (!keep) r.finished(decision.engine, decision, { ok: true, ttftMs: 100 });
  return decision;
}

/** Turn `n` of session `key` in project `p`: a 1,000-token system prompt and 500 tokens a turn. */
const nth = (key: string, n: number, model = "m"): TurnToRoute => ({
  key,
  model,
  promptTokens: 1000 + 500 * (n + 1),
  prefixTokens: n === 0 ? 0 : 1000 + 500 * n,
  sharedPrefixTokens: 1000,
});

Deno.test("router: round-robin takes the engines in turn, whatever the session", () => {
  const { router: r } = router("round-robin");
  deepEqual(
    Array.from({ length: 6 }, (_, i) => turn(r, nth("p/a", i)).engine),
    ["e0", "e1", "e2", "e3", "e0", "e1"],
  );
});

Deno.test("router: least-loaded picks the engine with the fewest turns in flight", () => {
  const { router: r } = router("least-loaded");
  const held = [0, 1, 2].map((i) => turn(r, nth(`p/s${i}`, 0), true));
  equal(new Set(held.map((d) => d.engine)).size, 3);
  const fourth = turn(r, nth("p/s3", 0), true);
  ok(!held.some((d) => d.engine === fourth.engine));
  r.finished(held[1].engine, held[1], { ok: true });
  equal(r.route(nth("p/s4", 0))!.engine, held[1].engine);
});

Deno.test("router: consistent-hash keeps a session on one engine and moves only a dead engine's sessions", () => {
  const { router: r } = router("consistent-hash");
  const keys = Array.from({ length: 200 }, (_, i) => `p/s${i}`);
  const before = new Map(keys.map((key) => [key, r.route(nth(key, 0))!.engine]));
  // Spread over all four, and sticky however loaded the engine is.
  equal(new Set(before.values()).size, 4);
  for (let n = 0; n < 5; n++) turn(r, nth("p/s0", n), true);
  equal(r.route(nth("p/s0", 5))!.engine, before.get("p/s0"));
  r.setHealthy("e2", false);
  for (const key of keys) {
    const now = r.route(nth(key, 1))!.engine;
    if (before.get(key) === "e2") ok(now !== "e2");
    else equal(now, before.get(key));
  }
});

Deno.test("router: a turn for an adapter goes only to engines serving it, under every policy", () => {
  const engines = [
    { id: "e0", models: ["m"] },
    { id: "e1", models: ["m", "lora-a"] },
    { id: "e2", models: ["m"] },
    { id: "e3", models: ["m", "lora-a"] },
  ];
  for (const policy of ["cache-aware", "round-robin", "least-loaded", "consistent-hash"] as const) {
    const { router: r } = router(policy, {}, engines);
    for (let i = 0; i < 20; i++) {
      const d = turn(r, nth(`p/s${i}`, 0, "lora-a"), true);
      ok(d.engine === "e1" || d.engine === "e3", `${policy} sent lora-a to ${d.engine}`);
    }
    equal(r.route(nth("p/x", 0, "lora-b")), undefined);
    r.setHealthy("e1", false);
    r.setHealthy("e3", false);
    equal(r.route(nth("p/x", 0, "lora-a")), undefined, policy);
  }
});

Deno.test("router: cache-aware keeps a session's turns on its home engine under light load", () => {
  const { router: r, clock } = router("cache-aware");
  const first = turn(r, nth("p/a", 0));
  equal(first.reason, "new");
  equal(first.uncachedTokens, 1500);
  for (let n = 1; n < 10; n++) {
    clock.now += 5000; // think time
    // Other sessions come and go meanwhile.
    turn(r, nth(`p/other${n}`, 0));
    const d = turn(r, nth("p/a", n));
    deepEqual([d.engine, d.reason, d.uncachedTokens], [first.engine, "home", 500]);
  }
  equal(r.homeOf("p/a"), first.engine);
});

Deno.test("router: a new session of a project finds its system prompt cached where the project ran, and only there", () => {
  const { router: r } = router("cache-aware");
  const first = turn(r, nth("p/a", 0));
  const others = new Set(FOUR.map((e) => e.id).filter((id) => id !== first.engine));
  // Where the system prompt is, only the session's own 500 tokens are prefilled.
  const there = r.route(nth("p/b", 0), others)!;
  deepEqual([there.engine, there.uncachedTokens], [first.engine, 500]);
  const elsewhere = r.route(nth("p/b", 0), new Set([first.engine]))!;
  equal(elsewhere.uncachedTokens, 1500);
});

Deno.test("router: a hot engine sheds new work, and a session moves when another engine saves the margin", () => {
  const { router: r } = router("cache-aware", { marginMs: 100 });
  const hot = turn(r, nth("p/hot", 0), true);
  // Keep the hot engine busy: 20 long turns of other clients in flight there.
  for (let i = 0; i < 20; i++) {
    r.started(hot.engine, { engine: hot.engine, reason: "new", uncachedTokens: 8000 });
  }
  // New sessions of the same project go elsewhere, although its system prompt is cached there.
  for (let i = 0; i < 8; i++) ok(turn(r, nth(`p/new${i}`, 0)).engine !== hot.engine);
  // The hot session's own next turn would wait behind 160,000 tokens at home: it moves.
  const moved = r.route(nth("p/hot", 1))!;
  ok(moved.engine !== hot.engine);
  equal(moved.reason, "moved_for_load");
});

Deno.test("router: paced sessions leave nothing in flight, yet recent work counts as load", () => {
  const { router: r, clock } = router("cache-aware", { marginMs: 10 });
  // One engine took a lot of prefill in the last seconds; nothing is in flight anywhere.
  const busy = turn(r, { key: "q/big", model: "m", promptTokens: 60_000 });
  for (let i = 0; i < 5; i++) {
    clock.now += 500;
    turn(r, { key: "q/big", model: "m", promptTokens: 60_000 * (i + 2), prefixTokens: 60_000 });
  }
  equal(r.snapshot().engines.find((e) => e.id === busy.engine)!.inFlight, 0);
  for (let i = 0; i < 8; i++) ok(turn(r, nth(`p/s${i}`, 0)).engine !== busy.engine);
});

Deno.test("router: an engine down re-homes its sessions in a stable order every instance computes alike", () => {
  const a = router("cache-aware").router;
  const b = router("cache-aware").router;
  // Sessions of many projects, so that no system prompt draws them together.
  const keys = Array.from({ length: 40 }, (_, i) => `p${i}/s${i}`);
  for (const r of [a, b]) for (const key of keys) turn(r, nth(key, 0));
  const homes = new Map(keys.map((key) => [key, a.homeOf(key)]));
  deepEqual(keys.map((key) => b.homeOf(key)), [...homes.values()]);
  equal(new Set(homes.values()).size, 4);
  for (const r of [a, b]) r.setHealthy("e1", false);
  const moved = keys.filter((key) => homes.get(key) === "e1");
  ok(moved.length > 0);
  const after = (r: Router) =>
    keys.map((key) => {
      const d = turn(r, nth(key, 1));
      equal(d.reason, homes.get(key) === "e1" ? "rehomed" : "home");
      return d.engine;
    });
  const fromA = after(a);
  deepEqual(after(b), fromA);
  ok(!fromA.includes("e1"));
  // Spread over the three left, not all on one.
  ok(new Set(moved.map((key) => fromA[keys.indexOf(key)])).size >= 2);
  // Back up: it takes new sessions again (it is the idlest).
  for (const r of [a, b]) r.setHealthy("e1", true);
  equal(a.snapshot().engines[1].healthy, true);
  ok(Array.from({ length: 8 }, (_, i) => turn(a, nth(`q/n${i}`, 0)).engine).includes("e1"));
});

Deno.test("router: a failed turn is retried elsewhere with the engines tried set aside", () => {
  const { router: r } = router("cache-aware");
  const first = turn(r, nth("p/a", 0));
  const d = r.route(nth("p/a", 1))!;
  r.started(d.engine, d);
  r.finished(d.engine, d, { ok: false });
  const retry = r.route(nth("p/a", 1), new Set([first.engine]))!;
  ok(retry.engine !== first.engine);
  equal(retry.reason, "rehomed");
  equal(r.route(nth("p/a", 1), new Set(FOUR.map((e) => e.id))), undefined);
  equal(r.snapshot().engines.find((e) => e.id === first.engine)!.failuresTotal, 1);
});

Deno.test("router: an engine that took more than its cache of other tokens is taken to have evicted a session", () => {
  const engines = [{ id: "e0", models: ["m"], cacheTokens: 10_000 }];
  const { router: r } = router("cache-aware", {}, engines);
  equal(turn(r, nth("p/a", 0)).uncachedTokens, 1500);
  equal(r.route(nth("p/a", 1))!.uncachedTokens, 500);
  for (let i = 0; i < 10; i++) turn(r, { key: `q/s${i}`, model: "m", promptTokens: 2000 });
  equal(r.route(nth("p/a", 1))!.uncachedTokens, 2000);
});

Deno.test("router: the prefill rate is measured from times to first token", () => {
  const { router: r } = router("cache-aware", { prefillTokensPerMs: 10 });
  for (let i = 0; i < 30; i++) {
    const d = r.route({ key: `p/s${i}`, model: "m", promptTokens: 4000 })!;
    r.started(d.engine, d);
    r.finished(d.engine, d, { ok: true, ttftMs: d.uncachedTokens / 2 });
  }
  const rates = r.snapshot().engines.map((e) => e.prefillTokensPerMs);
  ok(rates.some((rate) => rate < 3), String(rates));
});

Deno.test("router: a shared ledger's home is adopted; bad engine names are refused", () => {
  const { router: r } = router("cache-aware");
  r.adopt("p/a", "e3");
  const d = r.route(nth("p/a", 4))!;
  deepEqual([d.engine, d.reason, d.uncachedTokens], ["e3", "home", 500]);
  throws(() => r.started("e9", d), RangeError);
  throws(() => new Router(FOUR, { policy: "random" as RoutePolicy }), RangeError);
  const snapshot = r.snapshot();
  equal(snapshot.sessions, 1);
  equal(snapshot.engines[3].sessions, 1);
});

Deno.test("engine load: vLLM's gauges and counters, the older names, several engine cores", () => {
  const text = [
    "# HELP vllm:num_requests_running Number of requests in model execution batches.",
    "# TYPE vllm:num_requests_running gauge",
    'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
    'vllm:num_requests_running{engine="1",model_name="m"} 2.0',
    'vllm:num_requests_waiting{engine="0",model_name="m"} 4.0',
    'vllm:num_requests_waiting{engine="1",model_name="m"} 1.0',
    'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5',
    'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25',
    'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0',
    'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 600.0',
    'vllm:cache_config_info{block_size="16",cache_dtype="auto",num_gpu_blocks="2048"} 1.0',
    "",
  ].join("\n");
  deepEqual(parseEngineLoad(text), {
    waiting: 5,
    running: 5,
    kvCacheUsage: 0.375,
    prefixCacheHits: 600,
    prefixCacheQueries: 1000,
    cacheTokens: 32768,
  });
  deepEqual(
    parseEngineLoad(
      'vllm:gpu_cache_usage_perc{model_name="m"} 0.9\nvllm:gpu_prefix_cache_hits_total{model_name="m"} 7\n',
    ),
    { kvCacheUsage: 0.9, prefixCacheHits: 7 },
  );
  deepEqual(parseEngineLoad("not metrics\n"), {});
});

Deno.test("route ledger: two instances sharing the store keep a session on one engine, moves included", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    const ledger = new RouteLedger(kv, { ttlMs: 60_000 });
    const a = router("cache-aware").router;
    const b = router("cache-aware").router;
    // Instance a saw other sessions of project p; b saw none: on their own they could differ.
    for (let i = 0; i < 3; i++) turn(a, nth(`p/warm${i}`, 0));
    const first = (await ledger.route(a, nth("p/s", 0)))!;
    a.started(first.engine, first);
    a.finished(first.engine, first, { ok: true });
    equal(await ledger.home("p", "s"), first.engine);
    const second = (await ledger.route(b, nth("p/s", 1)))!;
    deepEqual([second.engine, second.reason, second.uncachedTokens], [first.engine, "home", 500]);
    // b finds that engine overloaded and moves the session; a follows.
    for (let i = 0; i < 20; i++) {
      b.started(first.engine, { engine: first.engine, reason: "new", uncachedTokens: 8000 });
    }
    const moved = (await ledger.route(b, nth("p/s", 1)))!;
    equal(moved.reason, "moved_for_load");
    b.started(moved.engine, moved);
    const third = (await ledger.route(a, nth("p/s", 2)))!;
    deepEqual([third.engine, third.reason], [moved.engine, "home"]);
    await ledger.forget("p", "s");
    equal(await ledger.home("p", "s"), undefined);
  } finally {
    kv.close();
  }
});

Deno.test("router: a trimmed history (nothing repeated) still finds the system prompt cached", () => {
  const { router: r } = router("cache-aware");
  const first = turn(r, nth("p/a", 3));
  const trimmed = r.route({ ...nth("p/a", 4), prefixTokens: 0 })!;
  deepEqual([trimmed.engine, trimmed.uncachedTokens], [first.engine, 2500]);
  // Not told what it repeats: taken to repeat all the previous prompt.
  equal(r.route({ ...nth("p/a", 4), prefixTokens: undefined })!.uncachedTokens, 500);
});

Deno.test("router: a new session goes where it fits, not where it would evict what others will reuse", () => {
  const engines = [
    { id: "e0", models: ["m"], cacheTokens: 10_000 },
    { id: "e1", models: ["m"], cacheTokens: 10_000 },
  ];
  const { router: r, clock } = router("cache-aware", {}, engines);
  const session = (key: string, promptTokens: number) => ({
    key,
    model: "m",
    promptTokens,
    sharedPrefixTokens: 1000,
  });
  // Turns that say nothing of the prefill rate: both engines keep the one assumed.
  const send = (t: TurnToRoute) => {
    const d = r.route(t)!;
    r.started(d.engine, d);
    r.finished(d.engine, d, { ok: true });
    return d;
  };
  // Engine `full` holds the project's system prompt and 8,500 tokens of its live sessions.
  const full = send(session("p/a", 5500)).engine;
  for (const key of ["p/b0", "p/b1"]) {
    r.adopt(key, full);
    send(session(key, 3000));
  }
  equal(r.snapshot().engines.find((e) => e.id === full)!.residentTokens, 9500);
  clock.now += 60_000; // their recent work forgotten: only the caches differ
  // There the new session would prefill 2,000 tokens and evict 1,500 others will need again;
  // on the empty engine it prefills 3,000.
  const d = r.route(session("p/new", 3000))!;
  ok(d.engine !== full);
  equal(d.uncachedTokens, 3000);
});

Deno.test("router: on a busy engine a move must save more, since its history's prefill delays others", () => {
  const { router: r, clock } = router("cache-aware", { marginMs: 50, recentHalfLifeMs: 1000 });
  const home = turn(r, { ...nth("p/a", 0), promptTokens: 6000, sharedPrefixTokens: 0 }).engine;
  // Every engine has been about 60 % busy prefilling over the last seconds.
  for (let step = 0; step < 20; step++) {
    clock.now += 100;
    for (const { id } of FOUR) {
      const work = { engine: id, reason: "new" as const, uncachedTokens: 800 };
      r.started(id, work);
      r.finished(id, work, { ok: true });
    }
  }
  // Home has 10,000 tokens queued (1 s), the others nothing: moving the 6,500-token history
  // would save 400 ms for this turn, but delay the turns that come after it there by more.
  r.started(home, { engine: home, reason: "new", uncachedTokens: 10_000 });
  equal(r.route({ ...nth("p/a", 1), promptTokens: 6500, prefixTokens: 6000 })!.engine, home);
  // Idle engines: the same queue at home is worth a move.
  const { router: idle } = router("cache-aware", { marginMs: 50 });
  const idleHome = turn(idle, { ...nth("p/a", 0), promptTokens: 6000, sharedPrefixTokens: 0 })
    .engine;
  idle.started(idleHome, { engine: idleHome, reason: "new", uncachedTokens: 10_000 });
  const moved = idle.route({ ...nth("p/a", 1), promptTokens: 6500, prefixTokens: 6000 })!;
  deepEqual([moved.reason, moved.engine !== idleHome], ["moved_for_load", true]);
});

Deno.test("router: under light load new sessions spread over the engines, not all where the system prompt went first", () => {
  const three = FOUR.slice(0, 3);
  const { router: r, clock } = router("cache-aware", {}, three);
  // One session at a time, nothing in flight when the next comes; the engines answer in a
  // fixed 50 ms plus 0.1 ms a token not cached, as vLLM's time to first token goes.
  const place = (key: string) => {
    clock.now += 2000;
    const d = r.route(nth(key, 0))!;
    r.started(d.engine, d);
    r.finished(d.engine, d, { ok: true, ttftMs: 50 + d.uncachedTokens / 10 });
    return d.engine;
  };
  const first = place("p/s0");
  const next = Array.from({ length: 9 }, (_, i) => place(`p/s${i + 1}`));
  const counts = three.map(({ id }) => [first, ...next].filter((e) => e === id).length);
  // Spreading costs each engine the system prompt once; piling up costs, at the first burst,
  // moving sessions and prefilling their histories again.
  ok(counts.every((n) => n >= 2), `sessions per engine: ${counts}`);
  // Each decision still says what the engine it chose has to prefill.
  for (const key of ["p/t0", "p/t1", "p/t2"]) {
    const d = r.route(nth(key, 0))!;
    equal(d.uncachedTokens, 500);
  }
});

Deno.test("router: on busy engines a new session goes where its project's system prompt is", () => {
  const two = FOUR.slice(0, 2);
  const { router: r, clock } = router("cache-aware", { marginMs: 50, recentHalfLifeMs: 1000 }, two);
  // Each project's prompt on one engine (idle, they spread).
  const projects = Array.from({ length: 6 }, (_, i) => `q${i}`);
  for (const p of projects) turn(r, nth(`${p}/first`, 0));
  const homes = projects.map((p) => r.homeOf(`${p}/first`)!);
  equal(new Set(homes).size, 2);
  // Both engines busy prefilling most of the last two seconds.
  for (let step = 0; step < 20; step++) {
    clock.now += 100;
    for (const { id } of two) {
      const work = { engine: id, reason: "new" as const, uncachedTokens: 1100 };
      r.started(id, work);
      r.finished(id, work, { ok: true });
    }
  }
  // Sessions of a project kept together save the cache room more copies of its prompt take.
  deepEqual(projects.map((p) => r.route(nth(`${p}/new`, 0))!.engine), homes);
});
