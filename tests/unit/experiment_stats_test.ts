/** The experiment statistics: known inputs give known intervals and verdicts. */

import assert from "node:assert/strict";
import {
  DurationHistogram,
  experimentFigures,
  ExperimentTally,
  guardrailBreaches,
  normalCdf,
  normalQuantile,
  type OutcomeRecord,
  type SessionFeedback,
  sessionsNeeded,
  tQuantile,
  welchDifference,
  wilson,
} from "../../lib/observability/experiment_stats.ts";
import { percentile } from "../../lib/_util.ts";
import { seededRandom } from "../_random.ts";

const close = (actual: number, expected: number, within: number, what: string) =>
  assert(Math.abs(actual - expected) <= within, `${what}: ${actual}, expected ${expected}`);

Deno.test("experiment stats: the normal and t quantiles match the tables", () => {
  close(normalQuantile(0.975), 1.959964, 1e-6, "z 0.975");
  close(normalQuantile(0.8), 0.841621, 1e-6, "z 0.8");
  close(normalQuantile(0.01), -2.326348, 1e-6, "z 0.01");
  close(normalCdf(1.959964), 0.975, 1e-6, "Φ(1.96)");
  close(tQuantile(0.975, 8), 2.306, 0.005, "t 0.975, 8 df");
  close(tQuantile(0.975, 30), 2.042, 0.002, "t 0.975, 30 df");
  close(tQuantile(0.95, 10), 1.812, 0.002, "t 0.95, 10 df");
});

Deno.test("experiment stats: the Wilson interval of 10 in 100 is 5.5% to 17.4%", () => {
  const interval = wilson(10, 100, 1.959964);
  close(interval.value, 0.1, 1e-12, "rate");
  close(interval.low, 0.05523, 1e-4, "low");
  close(interval.high, 0.17437, 1e-4, "high");
  // Half the independent sample (a design effect of 2): as wide as 5 in 50.
  const clustered = wilson(10, 100, 1.959964, 2);
  const half = wilson(5, 50, 1.959964);
  close(clustered.low, half.low, 1e-12, "clustered low");
  close(clustered.high, half.high, 1e-12, "clustered high");
  assert.deepEqual(wilson(0, 0, 1.96), { value: 0, low: 0, high: 1 });
});

Deno.test("experiment stats: Welch's interval of two known samples", () => {
  // Means 3 and 4, variances 2.5 each over 5: se 1, 8 degrees of freedom.
  const interval = welchDifference([1, 2, 3, 4, 5], [2, 3, 4, 5, 6], 0.05);
  close(interval.value, 1, 1e-12, "difference");
  close(interval.low, 1 - 2.306, 0.005, "low");
  close(interval.high, 1 + 2.306, 0.005, "high");
});

Deno.test("experiment stats: the sessions a test still needs, from effect and variances", () => {
  // (1.96 + 0.8416)² × (0.25 + 0.25) / 0.1² = 392.5 a side, 785 in all, 20 already there.
  const zSum = normalQuantile(0.975) + normalQuantile(0.8);
  assert.equal(sessionsNeeded(0.1, { varA: 0.25, varB: 0.25, nA: 10, nB: 10 }, zSum), 765);
  // 4 to 1: the smaller side needs the same precision, so the total grows.
  const uneven = sessionsNeeded(0.1, { varA: 0.25, varB: 0.25, nA: 40, nB: 10 }, zSum)!;
  assert(uneven > 765 + 20, `${uneven}`);
  assert.equal(sessionsNeeded(0, { varA: 0.25, varB: 0.25, nA: 10, nB: 10 }, zSum), undefined);
});

interface Arm {
  readonly name: string;
  readonly sessions: number;
  readonly errorRate: number;
  /** Chance a rated answer is rated 1 (else 0); undefined: no feedback. */
  readonly quality?: number;
  readonly ttfdMs?: number;
}

/** Outcomes and feedback of sessions of 1 to 8 turns, each arm as described. */
function simulate(arms: readonly Arm[], seed: number) {
  const next = seededRandom(seed);
  const outcomes: OutcomeRecord[] = [];
  const feedback: SessionFeedback[] = [];
  let at = 0;
  for (const arm of arms) {
    for (let s = 0; s < arm.sessions; s++) {
      const sessionId = `${arm.name}-${s}`;
      const turns = 1 + Math.floor(next() * 8);
      for (let t = 0; t < turns; t++) {
        const ok = next() >= arm.errorRate;
        const requestId = `r${t}`;
        outcomes.push({
          variant: arm.name,
          sessionId,
          requestId,
          ok,
          ...(!ok && { errorCode: "engine_unavailable" }),
          ...(ok && { ttfdMs: (arm.ttfdMs ?? 100) * (0.5 + next()) }),
          totalMs: 300,
          tokensIn: 50,
          tokensOut: ok ? 20 : 0,
          at: at++,
        });
        if (ok && arm.quality !== undefined && next() < 0.5) {
          feedback.push({ sessionId, requestId, score: next() < arm.quality ? 1 : 0, at: at++ });
        }
      }
    }
  }
  return { outcomes, feedback };
}

Deno.test("experiment stats: an A/A split says no difference yet, with sessions to go", () => {
  const { outcomes, feedback } = simulate([
    { name: "a", sessions: 150, errorRate: 0.05, quality: 0.6 },
    { name: "b", sessions: 150, errorRate: 0.05, quality: 0.6 },
  ], 7);
  const figures = experimentFigures(outcomes, feedback, { variants: ["a", "b"] });
  assert.equal(figures.baseline, "a");
  const [verdict] = figures.verdicts;
  assert.equal(verdict.metric, "feedback_score");
  assert.equal(verdict.outcome, "no_difference");
  assert.match(verdict.text, /^no difference yet/);
  assert(verdict.difference.low < 0 && verdict.difference.high > 0);
  // Without feedback the verdict is taken on the error rate: no difference there either.
  const errorsOnly = experimentFigures(outcomes, [], { variants: ["a", "b"] }).verdicts[0];
  assert.equal(errorsOnly.metric, "error_rate");
  assert.equal(errorsOnly.outcome, "no_difference");
  if (errorsOnly.moreSessions !== undefined) {
    assert.equal(
      errorsOnly.text,
      `no difference yet, about ${errorsOnly.moreSessions} more sessions needed`,
    );
  }
});

Deno.test("experiment stats: a variant known to be worse is found worse, and its figures", () => {
  const { outcomes, feedback } = simulate([
    { name: "a", sessions: 300, errorRate: 0.02, quality: 0.8, ttfdMs: 100 },
    { name: "b", sessions: 300, errorRate: 0.02, quality: 0.5, ttfdMs: 100 },
  ], 11);
  const figures = experimentFigures(outcomes, feedback, { variants: ["a", "b"] });
  const [a, b] = figures.variants;
  assert.equal(a.sessions, 300);
  assert.equal(b.sessions, 300);
  assert.equal(a.requests, outcomes.filter((o) => o.variant === "a").length);
  assert(a.meanScore!.low < 0.8 && a.meanScore!.high > 0.8, JSON.stringify(a.meanScore));
  assert(b.meanScore!.low < 0.5 && b.meanScore!.high > 0.5, JSON.stringify(b.meanScore));
  assert(a.errorRate.low < 0.02 && a.errorRate.high > 0.02, JSON.stringify(a.errorRate));
  assert(a.turnsPerSession!.low < 4.5 && a.turnsPerSession!.high > 4.5);
  assert.equal(b.tokensIn, b.requests * 50);
  assert.deepEqual(Object.keys(b.errors), ["engine_unavailable"]);
  const [verdict] = figures.verdicts;
  assert.equal(verdict.metric, "feedback_score");
  assert.equal(verdict.outcome, "worse");
  assert.equal(verdict.text, "b worse");
  // The other way round, b is the better one.
  const swapped = experimentFigures(outcomes, feedback, { variants: ["b", "a"] }).verdicts[0];
  assert.equal(swapped.text, "a better");
});

Deno.test("experiment stats: with no feedback, more errors make a variant worse", () => {
  const { outcomes } = simulate([
    { name: "a", sessions: 200, errorRate: 0.02 },
    { name: "b", sessions: 200, errorRate: 0.15 },
  ], 3);
  const [verdict] = experimentFigures(outcomes, [], { variants: ["a", "b"] }).verdicts;
  assert.equal(verdict.metric, "error_rate");
  assert.equal(verdict.text, "b worse");
  assert(verdict.difference.low > 0);
});

Deno.test("experiment stats: sessions are the unit: one session's many errors prove little", () => {
  // 20 sessions a side, one of b's failing 40 turns: per request 40 in 78 against 0 in 38,
  // but one session in twenty. Counted by requests it would look certain.
  const outcomes: OutcomeRecord[] = [];
  let at = 0;
  for (const variant of ["a", "b"]) {
    for (let s = 0; s < 20; s++) {
      const turns = variant === "b" && s === 0 ? 40 : 2;
      for (let t = 0; t < turns; t++) {
        const ok = !(variant === "b" && s === 0);
        outcomes.push({
          variant,
          sessionId: `${variant}${s}`,
          ok,
          totalMs: 10,
          tokensIn: 1,
          tokensOut: 1,
          at: at++,
        });
      }
    }
  }
  const figures = experimentFigures(outcomes, [], { variants: ["a", "b"] });
  assert.equal(figures.verdicts[0].outcome, "no_difference");
  const b = figures.variants[1];
  // Its interval is far wider than the plain Wilson interval of 40 in 78.
  const plain = wilson(40, 78, 1.959964);
  assert(b.errorRate.high - b.errorRate.low > 2 * (plain.high - plain.low));
});

Deno.test("experiment stats: the guardrail stops a variant shown worse, not a lucky few", () => {
  const margins = { errorRate: 0.05, ttfd: 0.5, minSessions: 20 };
  const bad = simulate([
    { name: "a", sessions: 60, errorRate: 0.02 },
    { name: "b", sessions: 60, errorRate: 0.4 },
  ], 5);
  const breaches = guardrailBreaches(bad.outcomes, ["a", "b"], margins);
  assert.equal(breaches.length, 1);
  assert.equal(breaches[0].variant, "b");
  assert.equal(breaches[0].metric, "error_rate");
  assert.match(breaches[0].reason, /^error rate \d/);
  // Too few sessions to tell: nothing is stopped.
  const few = simulate([
    { name: "a", sessions: 5, errorRate: 0 },
    { name: "b", sessions: 5, errorRate: 1 },
  ], 5);
  assert.deepEqual(guardrailBreaches(few.outcomes, ["a", "b"], margins), []);
  // Slower beyond the margin: three times the baseline's time to first delta.
  const slow = simulate([
    { name: "a", sessions: 40, errorRate: 0, ttfdMs: 100 },
    { name: "b", sessions: 40, errorRate: 0, ttfdMs: 300 },
  ], 9);
  const slowBreaches = guardrailBreaches(slow.outcomes, ["a", "b"], margins);
  assert.deepEqual(slowBreaches.map((b) => b.metric), ["ttfd"]);
  // An A/A split is left alone.
  const same = simulate([
    { name: "a", sessions: 100, errorRate: 0.1, ttfdMs: 100 },
    { name: "b", sessions: 100, errorRate: 0.1, ttfdMs: 100 },
  ], 13);
  assert.deepEqual(guardrailBreaches(same.outcomes, ["a", "b"], margins), []);
});

Deno.test("experiment stats: feedback counts for the variant that answered the rated request, and only for a request with an outcome", () => {
  // Session s answered twice by b; then the operator named a winner, a: the feedback on b's
  // answers, sent after, was stored with the variant answering the session then (a).
  const turn = (requestId: string, variant: string, sessionId = "s"): OutcomeRecord => ({
    variant,
    sessionId,
    requestId,
    ok: true,
    ttfdMs: 10,
    totalMs: 30,
    tokensIn: 5,
    tokensOut: 5,
    at: 1,
  });
  const outcomes = [turn("r1", "b"), turn("r2", "b"), turn("r1", "a", "t")];
  const feedback: SessionFeedback[] = [
    { sessionId: "s", requestId: "r1", variant: "a", score: 0, at: 2 },
    { sessionId: "s", requestId: "r2", variant: "a", score: 0, at: 2 },
    { sessionId: "t", requestId: "r1", variant: "a", score: 1, at: 2 },
    // A rating of an answer no outcome in the range tells of (given before the experiment, or
    // before the range): no variant's.
    { sessionId: "old", requestId: "r0", variant: "b", score: 1, at: 2 },
    { sessionId: "s", requestId: "r0", variant: "b", score: 1, at: 2 },
  ];
  const { variants } = experimentFigures(outcomes, feedback, { variants: ["a", "b"] });
  const [a, b] = variants;
  assert.equal(b.feedback, 2);
  assert.equal(b.meanScore?.value, 0);
  assert.equal(a.feedback, 1);
  assert.equal(a.meanScore?.value, 1);
  assert.equal(b.sessions, 1);
  assert.deepEqual([b.feedbackRate.value, b.feedbackRate.high], [1, 1]);
  assert(a.feedbackRate.low <= a.feedbackRate.value && a.feedbackRate.value <= 1);
});

Deno.test("experiment stats: the histogram's percentiles are exact below 1,024 ms and within 0.55% above", () => {
  const next = seededRandom(5);
  const histogram = new DurationHistogram();
  const values: number[] = [];
  for (let i = 0; i < 20_000; i++) {
    // 0 ms to a day, most of them under a few seconds, some with fractions of a millisecond.
    const ms = next() < 0.5 ? next() * 1024 : 1024 * 2 ** (next() ** 2 * 16);
    histogram.add(ms);
    values.push(ms);
  }
  for (const q of [0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 1]) {
    const exact = percentile(values, q)!;
    const bucketed = histogram.percentile(q)!;
    if (exact < 1024) assert.equal(bucketed, exact, `q ${q}`);
    else close(bucketed, exact, exact * 0.0055 + 1, `q ${q}`);
  }
  // Taken out again, the values leave nothing behind.
  for (const ms of values) histogram.remove(ms);
  assert.equal(histogram.percentile(0.5), null);
  histogram.add(3);
  assert.equal(histogram.percentile(0.95), 3);
});

Deno.test("experiment stats: a tally counts a rating for the request's variant whichever comes first, and forgets it with its outcome", () => {
  const tally = new ExperimentTally();
  const outcome: OutcomeRecord = {
    variant: "b",
    sessionId: "s1",
    requestId: "r1",
    ok: true,
    ttfdMs: 120,
    totalMs: 400,
    tokensIn: 5,
    tokensOut: 7,
    at: 2,
  };
  const rating: SessionFeedback = { sessionId: "s1", requestId: "r1", score: 3, at: 1 };
  const figures = () => tally.figures({ variants: ["a", "b"] }).variants[1];
  tally.addFeedback(rating);
  assert.equal(figures().feedback, 0);
  tally.addOutcome(outcome);
  assert.deepEqual(
    figures(),
    experimentFigures([outcome], [rating], { variants: ["a", "b"] }).variants[1],
  );
  assert.equal(figures().meanScore?.value, 3);
  // Its outcome gone, the rating counts no more, and the session is forgotten.
  tally.removeOutcome(outcome);
  assert.deepEqual(
    [figures().sessions, figures().feedback, figures().requests, figures().ttfdMs.p50],
    [0, 0, 0, null],
  );
  assert.deepEqual(tally.figures(), { baseline: "a", variants: [], verdicts: [] });
  tally.removeFeedback(rating);
  tally.addOutcome(outcome);
  assert.equal(figures().feedback, 0);
});
