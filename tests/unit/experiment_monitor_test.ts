/**
 * The experiment monitor and its outcome log, on an in-memory Deno KV with an
 * injected clock: outcomes stored in batches and read back by time range,
 * per-variant metrics, the panels' figures with feedback, and the guardrail
 * stopping a variant through the injected stop (no timer: checked directly).
 */

import { deepEqual, equal, match } from "node:assert/strict";
import { ExperimentMonitor, type TurnOutcome } from "../../lib/observability/experiment_monitor.ts";
import {
  OutcomeLog,
  readExperimentMeta,
  readFeedback,
  readOutcomes,
} from "../../lib/observability/outcome_log.ts";
import { stopVariant } from "../../lib/gateway/experiments.ts";
import { renderMetrics } from "../../lib/observability/prometheus.ts";
import {
  experimentFigures,
  type OutcomeRecord,
  type SessionFeedback,
} from "../../lib/observability/experiment_stats.ts";
import { abReport } from "../../tools/ab_report.ts";
import { seededRandom } from "../_random.ts";

const ok = (ttfdMs: number): TurnOutcome => ({
  ok: true,
  ttfdMs,
  totalMs: ttfdMs * 3,
  tokensIn: 10,
  tokensOut: 5,
});
/**
 * `actual` deep-equals `expected` but for numbers that differ in their last digits: sessions
 * that outlived their first turns in memory come in another order, so sums over sessions
 * round differently.
 */
function deepClose(actual: unknown, expected: unknown, path = "figures"): void {
  if (typeof actual === "number" && typeof expected === "number") {
    const within = 1e-12 * Math.max(1, Math.abs(expected));
    equal(
      actual === expected || Math.abs(actual - expected) <= within,
      true,
      `${path}: ${actual} against ${expected}`,
    );
  } else if (
    typeof actual === "object" && actual !== null && typeof expected === "object" &&
    expected !== null
  ) {
    deepEqual(Object.keys(actual).sort(), Object.keys(expected).sort(), path);
    for (const [key, value] of Object.entries(actual)) {
      deepClose(value, (expected as Record<string, unknown>)[key], `${path}.${key}`);
    }
  } else equal(actual, expected, path);
}

const failedTokens = { totalMs: 4, tokensIn: 0, tokensOut: 0 };
const failed: TurnOutcome = {
  ok: false,
  errorCode: "context_overflow",
  totalMs: 4,
  tokensIn: 0,
  tokensOut: 0,
};

Deno.test("outcome log: a burst is written in batches and read back by project, experiment and time", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    const log = new OutcomeLog(kv);
    for (let i = 0; i < 1200; i++) {
      log.add("maze", i < 1000 ? "x1" : "x2", {
        variant: i % 2 === 0 ? "a" : "b",
        sessionId: `s${i % 50}`,
        ok: true,
        totalMs: 1,
        tokensIn: 1,
        tokensOut: 1,
        at: i,
      });
    }
    await log.flushed();
    equal(log.lost, 0);
    const all = await readOutcomes(kv, "maze");
    deepEqual([...all.keys()], ["x1", "x2"]);
    equal(all.get("x1")!.length, 1000);
    equal(all.get("x2")!.length, 200);
    const some = await readOutcomes(kv, "maze", { since: 100, until: 150 });
    equal(some.get("x1")!.length, 50);
    equal((await readOutcomes(kv, "general")).size, 0);

    await log.describe("maze", "x1", ["a", "b"]);
    deepEqual((await readExperimentMeta(kv, "maze", "x1"))?.variants, ["a", "b"]);
    await kv.set(["feedback", "maze", "s1", "r1"], { variant: "b", score: 1, at: 5 });
    await kv.set(["feedback", "maze", "s2", "r9"], { score: 0, at: 500 });
    deepEqual(await readFeedback(kv, "maze", { until: 100 }), [
      { variant: "b", score: 1, at: 5, sessionId: "s1", requestId: "r1" },
    ]);
  } finally {
    kv.close();
  }
});

Deno.test("experiment monitor: metrics, panels with feedback, and what a restart finds", async () => {
  const kv = await Deno.openKv(":memory:");
  let now = 1_000_000;
  const experiments = new Map([["maze", { salt: "m1", variants: ["a", "b"] }]]);
  try {
    const monitor = await ExperimentMonitor.open({ kv, experiments, now: () => now });
    monitor.turnEnded("maze", "s1", "r1", "a", ok(100));
    monitor.turnEnded("maze", "s1", "r2", "a", ok(300));
    monitor.turnEnded("maze", "s2", "r1", "b", failed);
    monitor.turnEnded("maze", "s3", "r1", "b", { ...ok(50), parseFailed: true });
    // Which variant answered a request, for its rating: one that failed answered nothing.
    equal(monitor.answeredBy("maze", "s3", "r1"), "b");
    equal(monitor.answeredBy("maze", "s1", "r2"), "a");
    equal(monitor.answeredBy("maze", "s2", "r1"), undefined);
    equal(monitor.answeredBy("maze", "s9", "r1"), undefined);
    const metrics = monitor.prometheus();
    match(
      metrics,
      /^vllm_mqtt_variant_requests_total\{project="maze",variant="a",outcome="answered"\} 2$/m,
    );
    match(
      metrics,
      /^vllm_mqtt_variant_requests_total\{project="maze",variant="b",outcome="context_overflow"\} 1$/m,
    );
    match(
      metrics,
      /^vllm_mqtt_variant_time_to_first_delta_seconds_count\{project="maze",variant="a"\} 2$/m,
    );
    match(
      metrics,
      /^vllm_mqtt_variant_time_to_first_delta_seconds_sum\{project="maze",variant="a"\} 0\.4$/m,
    );
    match(metrics, /^vllm_mqtt_variant_parse_failures_total\{project="maze",variant="b"\} 1$/m);
    match(metrics, /^vllm_mqtt_variant_outcomes_dropped_total\{reason="queue_full"\} 0$/m);
    match(metrics, /^vllm_mqtt_variant_prompt_tokens_total\{project="maze",variant="a"\} 20$/m);

    // As the feedback topic tells it of what it stored.
    monitor.feedbackStored("maze", { sessionId: "s1", requestId: "r1", score: 1, at: now });
    // Feedback of a session with no turn in this experiment is not its.
    monitor.feedbackStored("maze", { sessionId: "elsewhere", requestId: "r1", score: 0, at: now });
    const [panel] = await monitor.panels();
    equal(panel.project, "maze");
    equal(panel.experiment, "m1");
    const [a, b] = panel.figures.variants;
    deepEqual([a.name, a.sessions, a.requests, a.feedback, a.meanScore?.value], ["a", 1, 2, 1, 1]);
    deepEqual([b.name, b.sessions, b.requests, b.parseFailures], ["b", 2, 2, 1]);
    deepEqual(b.errors, { context_overflow: 1 });
    equal(a.ttfdMs.p50, 300);
    deepEqual(panel.stopped, {});
    equal(panel.winner, null);
    await monitor.close();

    // A restart reads what the store kept; past the retention, nothing.
    now += 1000;
    const again = await ExperimentMonitor.open({ kv, experiments, now: () => now });
    equal((await again.panels())[0].figures.variants[0].requests, 2);
    await again.close();
    now += 31 * 24 * 3_600_000;
    const later = await ExperimentMonitor.open({ kv, experiments, now: () => now });
    equal((await later.panels())[0].figures.variants[0].requests, 0);
    await later.close();
  } finally {
    kv.close();
  }
});

/** A store that counts the entries read from it by `list` and the keys by `get`. */
function countingStore(kv: Deno.Kv): { kv: Deno.Kv; reads: { listed: number; got: number } } {
  const reads = { listed: 0, got: 0 };
  const counting = new Proxy(kv, {
    get(target, prop) {
      const value = Reflect.get(target, prop);
      if (prop === "list") {
        return (...args: Parameters<Deno.Kv["list"]>) =>
          (async function* () {
            for await (const entry of target.list(...args)) {
              reads.listed++;
              yield entry;
            }
          })();
      }
      if (prop === "get") {
        return (...args: Parameters<Deno.Kv["get"]>) => {
          reads.got++;
          return target.get(...args);
        };
      }
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
  return { kv: counting, reads };
}

Deno.test("experiment monitor: a panel refresh reads no stored feedback or outcome, however many", async () => {
  const store = await Deno.openKv(":memory:");
  let now = 1_000_000_000;
  const n = 2000;
  try {
    // What earlier runs stored: a turn and a rating for each of n sessions.
    for (let i = 0; i < n; i += 250) {
      const op = store.atomic();
      for (let j = i; j < i + 250; j++) {
        const variant = j % 2 === 0 ? "a" : "b";
        const at = now - 1000 + j % 500;
        op.set(["outcome", "maze", "m1", at, `t${j}`], {
          variant,
          sessionId: `s${j}`,
          requestId: "r1",
          ok: true,
          ttfdMs: 100,
          totalMs: 300,
          tokensIn: 1,
          tokensOut: 1,
          at,
        });
        op.set(["feedback", "maze", `s${j}`, "r1"], { variant, score: j % 4 === 0 ? 0 : 1, at });
      }
      await op.commit();
    }
    const { kv, reads } = countingStore(store);
    const monitor = await ExperimentMonitor.open({
      kv,
      experiments: new Map([["maze", { salt: "m1", variants: ["a", "b"] }]]),
      now: () => now,
    });
    // Loaded once at the start.
    equal(reads.listed, 2 * n);
    reads.listed = 0;
    reads.got = 0;
    for (let refresh = 0; refresh < 5; refresh++) {
      now += 2000;
      const [panel] = await monitor.panels();
      const [a, b] = panel.figures.variants;
      deepEqual([a.sessions, a.feedback, b.sessions, b.feedback], [n / 2, n / 2, n / 2, n / 2]);
    }
    // Each refresh read the experiment's control (one key), nothing that grows with history.
    deepEqual(reads, { listed: 0, got: 5 });
    // A rating stored since counts at the next refresh, still without reading the store.
    monitor.turnEnded("maze", "new", "r1", "b", ok(100));
    monitor.feedbackStored("maze", { sessionId: "new", requestId: "r1", score: 1, at: now });
    now += 2000;
    const [panel] = await monitor.panels();
    deepEqual([panel.figures.variants[1].sessions, panel.figures.variants[1].feedback], [
      n / 2 + 1,
      n / 2 + 1,
    ]);
    equal(reads.listed, 0);
    await monitor.close();
  } finally {
    store.close();
  }
});

Deno.test("experiment monitor: the panel and the report give the same figures on the same turns and ratings", async () => {
  const kv = await Deno.openKv(":memory:");
  let now = 1_000_000_000;
  try {
    const monitor = await ExperimentMonitor.open({
      kv,
      experiments: new Map([["maze", { salt: "m1", variants: ["a", "b"] }]]),
      now: () => now,
    });
    const next = seededRandom(11);
    for (let i = 0; i < 3000; i++) {
      const session = Math.floor(next() * 400);
      const variant = session % 3 === 0 ? "b" : "a";
      const requestId = `r${i}`;
      // First deltas from 20 ms to 5 s, totals to 20 s: both sides of the histogram's exact part.
      const ttfdMs = 20 + next() ** 3 * 5000;
      const outcome: TurnOutcome = next() < 0.06
        ? { ok: false, errorCode: next() < 0.5 ? "engine_unavailable" : "timeout", ...failedTokens }
        : {
          ok: true,
          ttfdMs,
          totalMs: ttfdMs + next() * 15_000,
          tokensIn: 40,
          tokensOut: 10 + Math.floor(next() * 90),
          ...(next() < 0.05 && { parseFailed: true }),
        };
      monitor.turnEnded("maze", `s${session}`, requestId, variant, outcome);
      now += 7;
      if (outcome.ok && next() < 0.4) {
        const rating = next() < 0.2
          ? { label: "solved", at: now }
          : { score: variant === "b" ? Math.round(next() * 4) : Math.round(next() * 3), at: now };
        // As the feedback topic stores it, and then tells the monitor.
        await kv.set(["feedback", "maze", `s${session}`, requestId], { variant, ...rating });
        monitor.feedbackStored("maze", { sessionId: `s${session}`, requestId, ...rating });
      }
    }
    // A rating of a request that has no outcome counts on neither side.
    await kv.set(["feedback", "maze", "s1", "unknown"], { score: 1, at: now });
    monitor.feedbackStored("maze", { sessionId: "s1", requestId: "unknown", score: 1, at: now });
    await monitor.flushed();
    const [panel] = await monitor.panels();
    const [report] = await abReport(kv, "maze", {});
    const page = panel.figures;
    const stored = report.figures;
    deepEqual(page.verdicts, stored.verdicts);
    equal(page.variants.length, 2);
    for (const [i, variant] of page.variants.entries()) {
      const expected = stored.variants[i];
      // Percentiles come from the histogram's buckets: exact below 1,024 ms, within 0.55% above.
      for (const duration of ["ttfdMs", "totalMs"] as const) {
        for (const q of ["p50", "p95"] as const) {
          const shown = variant[duration][q]!;
          const exact = expected[duration][q]!;
          if (exact < 1024) equal(shown, exact, `${variant.name} ${duration} ${q}`);
          else {
            const within = Math.abs(shown - exact) / exact;
            equal(
              within <= 0.0055 + 1 / exact,
              true,
              `${variant.name} ${duration} ${q}: ${shown} against ${exact}`,
            );
          }
        }
      }
      const withoutPercentiles = (v: typeof variant) => ({
        ...v,
        ttfdMs: v.ttfdMs.mean,
        totalMs: v.totalMs.mean,
      });
      deepEqual(withoutPercentiles(variant), withoutPercentiles(expected));
    }
    // Figures that exercise every part: both variants have errors of two codes, ratings, scores.
    equal(page.verdicts[0].metric, "feedback_score");
    equal(Object.keys(page.variants[1].errors).length, 2);
    equal(page.variants[0].ttfdMs.p95! > 1024 && page.variants[0].ttfdMs.p50! < 1024, true);
    await monitor.close();
  } finally {
    kv.close();
  }
});

Deno.test("experiment monitor: turns and ratings past the bound or the retention leave the panel as they leave memory", async () => {
  const kv = await Deno.openKv(":memory:");
  let now = 1_000_000_000;
  try {
    const monitor = await ExperimentMonitor.open({
      kv,
      experiments: new Map([["maze", { salt: "m1", variants: ["a", "b"] }]]),
      maxRecords: 100,
      retentionMs: 1_000_000,
      panelCacheMs: 0,
      now: () => now,
    });
    const outcomes: OutcomeRecord[] = [];
    const feedback: SessionFeedback[] = [];
    for (let i = 0; i < 250; i++) {
      const sessionId = `s${i % 30}`;
      const variant = i % 30 < 10 ? "b" : "a";
      // Totals (three times the first delta) under 1,024 ms, where the histogram is exact.
      const outcome = i % 9 === 0 ? failed : ok(50 + (i * 37) % 290);
      monitor.turnEnded("maze", sessionId, `r${i}`, variant, outcome);
      outcomes.push({ variant, sessionId, requestId: `r${i}`, ...outcome, at: now });
      if (outcome.ok && i % 2 === 0) {
        const rating = { sessionId, requestId: `r${i}`, score: i % 5, at: now };
        monitor.feedbackStored("maze", rating);
        feedback.push(rating);
      }
      now += 1000;
    }
    // Kept: the newest outcomes, a tenth dropped at a time beyond 100 (90 to 100 of them).
    const held = (list: readonly { readonly at: number }[], max: number) => {
      let count = 0;
      for (let i = 0; i < list.length; i++) {
        count = count + 1 > max ? Math.floor(max * 0.9) : count + 1;
      }
      return count;
    };
    const kept = outcomes.slice(-held(outcomes, 100));
    const keptFeedback = feedback.slice(-held(feedback, 100));
    const expected = experimentFigures(kept, keptFeedback, { variants: ["a", "b"] });
    deepClose((await monitor.panels())[0].figures, expected);
    // Past the retention: what is older than 1,000 s leaves, at the next refresh.
    now += 1_000_000 - 60_000;
    const since = now - 1_000_000;
    const recent = experimentFigures(
      kept.filter((o) => o.at >= since),
      keptFeedback.filter((f) => f.at >= since),
      { variants: ["a", "b"] },
    );
    equal(recent.variants[0].requests + recent.variants[1].requests, 60);
    deepClose((await monitor.panels())[0].figures, recent);
    now += 1_000_000;
    const empty = (await monitor.panels())[0].figures;
    deepEqual(empty.variants.map((v) => [v.requests, v.sessions, v.feedback]), [[0, 0, 0], [
      0,
      0,
      0,
    ]]);
    await monitor.close();
  } finally {
    kv.close();
  }
});

Deno.test("experiment monitor: the guardrail stops a failing variant once, and the panel says why", async () => {
  const kv = await Deno.openKv(":memory:");
  const stops: string[] = [];
  const told: string[] = [];
  try {
    const monitor = await ExperimentMonitor.open({
      kv,
      experiments: new Map([["maze", { salt: "m1", variants: ["a", "b"] }]]),
      guardrail: { errorRate: 0.05, ttfd: 0.5, minSessions: 10, intervalMs: 3_600_000 },
      stopVariant: async (project, variant, reason) => {
        stops.push(`${project}/${variant}`);
        told.push(`${project}/${variant}: ${reason}`);
        await stopVariant(kv, project, "m1", variant, reason);
      },
    });
    for (let s = 0; s < 9; s++) {
      monitor.turnEnded("maze", `a${s}`, "r1", "a", ok(100));
      monitor.turnEnded("maze", `b${s}`, "r1", "b", failed);
    }
    // Nine sessions each: too few to tell.
    deepEqual(await monitor.checkGuardrail(), []);
    monitor.turnEnded("maze", "a9", "r1", "a", ok(100));
    monitor.turnEnded("maze", "b9", "r1", "b", failed);
    const [breach] = await monitor.checkGuardrail();
    equal(breach.variant, "b");
    equal(breach.metric, "error_rate");
    deepEqual(stops, ["maze/b"]);
    match(
      told[0],
      /^maze\/b: guardrail: error rate 100% against the baseline's 0% \(10 and 10 sessions\)/,
    );
    // Stopped already: not again.
    deepEqual(await monitor.checkGuardrail(), []);
    deepEqual(stops, ["maze/b"]);
    const [panel] = await monitor.panels();
    match(panel.stopped.b, /^guardrail: error rate/);
    await monitor.close();
  } finally {
    kv.close();
  }
});

Deno.test("outcome log: while the store stalls the queue holds at most its bound, the rest dropped and counted", async () => {
  const kv = await Deno.openKv(":memory:");
  let release!: () => void;
  const stalled = new Promise<void>((resolve) => release = resolve);
  // A store whose writes wait until released.
  const slow = new Proxy(kv, {
    get(target, prop) {
      if (prop !== "atomic") {
        const value = Reflect.get(target, prop);
        return typeof value === "function" ? value.bind(target) : value;
      }
      return () => {
        const op = target.atomic();
        return new Proxy(op, {
          get(o, name) {
            if (name === "commit") return async () => (await stalled, o.commit());
            const value = Reflect.get(o, name);
            return typeof value === "function" ? value.bind(o) : value;
          },
        });
      };
    },
  });
  const record = (i: number) => ({
    variant: "a",
    sessionId: `s${i}`,
    ok: true,
    totalMs: 1,
    tokensIn: 1,
    tokensOut: 1,
    at: i,
  });
  try {
    const log = new OutcomeLog(slow, { maxPending: 5 });
    log.add("maze", "x1", record(0));
    // The first is being written (and waits on the store); what comes meanwhile queues, up to 5.
    await Promise.resolve();
    for (let i = 1; i <= 8; i++) log.add("maze", "x1", record(i));
    equal(log.pending, 5);
    equal(log.dropped, 3);
    match(
      renderMetrics([log.notStored]),
      /^vllm_mqtt_variant_outcomes_dropped_total\{reason="queue_full"\} 3$/m,
    );
    match(
      renderMetrics([log.notStored]),
      /^vllm_mqtt_variant_outcomes_dropped_total\{reason="store_error"\} 0$/m,
    );
    release();
    await log.flushed();
    // The one in flight and the five queued: the oldest kept, the newest dropped.
    deepEqual(
      (await readOutcomes(kv, "maze")).get("x1")!.map((r) => r.sessionId),
      ["s0", "s1", "s2", "s3", "s4", "s5"],
    );
    equal(log.pending, 0);
  } finally {
    kv.close();
  }
});
