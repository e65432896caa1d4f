/**
 * The figures of an A/B experiment, computed from its outcome records and
 * feedback (pure: no clock, no store), through running sums per variant and
 * session ({@linkcode ExperimentTally}): the report fills them from the
 * records at once, the live page as turns end and ratings come, so both give
 * the same figures; the page's percentiles come from a fixed-bucket
 * histogram ({@linkcode DurationHistogram}). Per variant: requests, errors by code,
 * time to first delta and total time (p50/p95), tokens, answers that failed
 * to parse, turns per session, feedback rate and mean score, each with a 95%
 * confidence interval; and a plain verdict comparing each variant with the
 * baseline (the first variant listed).
 *
 * Sessions are the unit of assignment (a session keeps its variant), so turns
 * of one session are not independent observations: a player who keeps
 * failing fails many turns. Every test here therefore counts sessions:
 *
 * - Rates (errors, parse failures, feedback per request) are shown with a
 *   Wilson interval whose sample size is the number of requests divided by
 *   the design effect: the variance of the rate with sessions as clusters
 *   (the ratio estimator's cluster-robust variance) over the variance if
 *   every request were independent, at least 1. With one request a session
 *   it is the plain Wilson interval (but for the k/(k−1) of the cluster
 *   variance).
 * - The difference of two rates has an Agresti–Caffo interval (one success
 *   and one failure added to each side), widened by the same design effects.
 * - Means (feedback score, time to first delta, turns per session) are first
 *   taken per session, then compared over sessions with Welch's interval
 *   (Student's t with the Welch–Satterthwaite degrees of freedom).
 *
 * The verdict's primary metric is the mean feedback score when both the
 * baseline and the variant have scored feedback from at least
 * {@linkcode MIN_SCORED_SESSIONS} sessions, else the error rate. A variant is
 * "better" or "worse" when the 95% interval of its difference from the
 * baseline excludes zero (Bonferroni-corrected when there are more than two
 * variants); otherwise "no difference yet", with the number of sessions a
 * test of 95% confidence and 80% power would need if the observed difference
 * and variances were the true ones.
 *
 * @module
 */

import { percentile } from "../_util.ts";

/** One finished turn of a session in an experiment, as stored. */
export interface OutcomeRecord {
  readonly variant: string;
  readonly sessionId: string;
  readonly requestId?: string;
  readonly ok: boolean;
  readonly errorCode?: string;
  /** Milliseconds from arrival to the first delta (absent when none came). */
  readonly ttfdMs?: number;
  readonly totalMs: number;
  readonly tokensIn: number;
  readonly tokensOut: number;
  /** A hint or JSON answer that did not parse as the JSON object the project asks for. */
  readonly parseFailed?: boolean;
  /** When it ended, in Unix milliseconds. */
  readonly at: number;
}

/** One rating or label of an answer, as stored by the feedback topic. */
export interface SessionFeedback {
  readonly sessionId: string;
  readonly requestId: string;
  /**
   * The session's variant when the feedback came, as stored; the figures take the variant
   * from the rated request's outcome instead (the one that answered it).
   */
  readonly variant?: string;
  readonly score?: number;
  readonly label?: string;
  readonly at: number;
}

/** An estimate and its confidence interval. */
export interface Interval {
  readonly value: number;
  readonly low: number;
  readonly high: number;
}

/** Percentiles of a duration, in milliseconds, and the mean over sessions with its interval. */
export interface DurationFigures {
  readonly p50: number | null;
  readonly p95: number | null;
  readonly mean: Interval | null;
}

/** What one variant did. */
export interface VariantFigures {
  readonly name: string;
  readonly sessions: number;
  readonly requests: number;
  readonly answered: number;
  readonly errors: Readonly<Record<string, number>>;
  readonly errorRate: Interval;
  readonly ttfdMs: DurationFigures;
  readonly totalMs: DurationFigures;
  readonly tokensIn: number;
  readonly tokensOut: number;
  readonly parseFailures: number;
  readonly parseFailureRate: Interval;
  readonly turnsPerSession: Interval | null;
  /** Feedback given, per request. */
  readonly feedback: number;
  readonly feedbackRate: Interval;
  /** Sessions with at least one scored feedback. */
  readonly scoredSessions: number;
  /** Mean score over sessions (each session's mean first). */
  readonly meanScore: Interval | null;
}

/** What a verdict is decided on. */
export type VerdictMetric = "feedback_score" | "error_rate";

/** A variant against the baseline. */
export interface Verdict {
  readonly variant: string;
  readonly baseline: string;
  readonly metric: VerdictMetric;
  /** The variant's value less the baseline's, with its interval. */
  readonly difference: Interval;
  readonly outcome: "better" | "worse" | "no_difference";
  /** With no difference yet: sessions (of both variants together) a test would still need. */
  readonly moreSessions?: number;
  /** "b better", "b worse", "no difference yet, about N more sessions needed". */
  readonly text: string;
}

/** Figures and verdicts of one experiment. */
export interface ExperimentFigures {
  readonly baseline: string;
  readonly variants: readonly VariantFigures[];
  readonly verdicts: readonly Verdict[];
}

/** Options of {@linkcode experimentFigures}. */
export interface ExperimentStatsOptions {
  /**
   * The variants in their listed order (the first is the baseline); variants
   * seen in the records but not listed come after, in order of name.
   * @default {[]}
   */
  readonly variants?: readonly string[];
  /** Two-sided significance level of every interval. @default {0.05} */
  readonly alpha?: number;
  /** Power the sample size of "no difference yet" is computed for. @default {0.8} */
  readonly power?: number;
}

/** Sessions with scored feedback each side needs before the verdict is taken on the score. */
export const MIN_SCORED_SESSIONS = 2;

/** A session's turns and feedback, the unit every test counts. */
interface SessionFigures {
  requests: number;
  errors: number;
  parseFailures: number;
  feedback: number;
  /** Scored feedback: how many, and the scores' sum (the session's mean is their ratio). */
  scores: number;
  scoreSum: number;
  /** Times to first delta: how many, and their sum. */
  ttfds: number;
  ttfdSum: number;
}

/** The requests' durations of a variant, for their percentiles. */
interface DurationSample {
  add(ms: number): void;
  remove(ms: number): void;
  percentile(q: number): number | null;
}

/** Per variant: its sessions, and the request-level figures that need no clustering. */
interface VariantData {
  readonly sessions: Map<string, SessionFigures>;
  readonly errors: Record<string, number>;
  readonly ttfds: DurationSample;
  readonly totals: DurationSample;
  tokensIn: number;
  tokensOut: number;
}

/** The outcomes and feedback of one request of a session (`session\0request`). */
interface RequestEntry {
  /** The variant that answered it (its latest outcome's); undefined with no outcome held. */
  variant: string | undefined;
  /** Its outcome records held. */
  outcomes: number;
  /** Its feedback held, counted for `variant` when there is one. */
  readonly feedback: SessionFeedback[];
}

/** Options of {@linkcode ExperimentTally}. */
export interface ExperimentTallyOptions {
  /**
   * Percentiles from a {@linkcode DurationHistogram} (bounded memory and cost,
   * exact below 1,024 ms, within 0.6% above) instead of every duration.
   * @default {false}
   */
  readonly bucketed?: boolean;
}

/**
 * An experiment's figures kept as running sums: per variant and session,
 * counts and sums (requests, errors, parse failures, feedback, scores, times
 * to first delta), errors by code, tokens, and the durations for their
 * percentiles. Outcomes and feedback are added as they come and removed as
 * they leave (the oldest first), so the figures cost a pass over the sessions,
 * not over every record. Feedback counts for the variant that answered the
 * rated request (its latest outcome held), whichever comes first.
 */
export class ExperimentTally {
  readonly #data = new Map<string, VariantData>();
  readonly #requests = new Map<string, RequestEntry>();
  readonly #bucketed: boolean;

  constructor(options: ExperimentTallyOptions = {}) {
    this.#bucketed = options.bucketed ?? false;
  }

  /** Counts an outcome. */
  addOutcome(o: OutcomeRecord): void {
    this.#outcome(o, 1);
    if (o.requestId === undefined) return;
    const key = `${o.sessionId}\0${o.requestId}`;
    let entry = this.#requests.get(key);
    if (!entry) this.#requests.set(key, entry = { variant: undefined, outcomes: 0, feedback: [] });
    entry.outcomes++;
    if (entry.variant !== o.variant) {
      this.#rated(entry, -1);
      entry.variant = o.variant;
      this.#rated(entry, 1);
    }
  }

  /** No longer counts an outcome added before (the oldest held go first). */
  removeOutcome(o: OutcomeRecord): void {
    this.#outcome(o, -1);
    const key = `${o.sessionId}\0${o.requestId}`;
    const entry = o.requestId === undefined ? undefined : this.#requests.get(key);
    if (entry && --entry.outcomes === 0) {
      this.#rated(entry, -1);
      entry.variant = undefined;
      if (entry.feedback.length === 0) this.#requests.delete(key);
    }
    this.#prune(o.variant, o.sessionId);
  }

  /** Counts a rating or label, for the variant that answered it (once its outcome is here). */
  addFeedback(f: SessionFeedback): void {
    const key = `${f.sessionId}\0${f.requestId}`;
    let entry = this.#requests.get(key);
    if (!entry) this.#requests.set(key, entry = { variant: undefined, outcomes: 0, feedback: [] });
    entry.feedback.push(f);
    if (entry.variant !== undefined) this.#feedback(entry.variant, f, 1);
  }

  /** No longer counts a rating or label added before (the same object). */
  removeFeedback(f: SessionFeedback): void {
    const key = `${f.sessionId}\0${f.requestId}`;
    const entry = this.#requests.get(key);
    const at = entry?.feedback.indexOf(f) ?? -1;
    if (!entry || at < 0) return;
    entry.feedback.splice(at, 1);
    if (entry.variant !== undefined) this.#feedback(entry.variant, f, -1);
    if (entry.outcomes === 0 && entry.feedback.length === 0) this.#requests.delete(key);
  }

  /** The figures of every variant, and each one's verdict against the baseline. */
  figures(options: ExperimentStatsOptions = {}): ExperimentFigures {
    const alpha = options.alpha ?? 0.05;
    const power = options.power ?? 0.8;
    const data = this.#data;
    const listed = options.variants ?? [];
    const names = [
      ...listed,
      ...[...data.keys()].filter((name) => !listed.includes(name)).sort(),
    ];
    const z = normalQuantile(1 - alpha / 2);
    const sums = new Map(names.map((name) => [name, sessionSums(data.get(name))]));
    const variants = names.map((name) =>
      variantFigures(name, data.get(name) ?? emptyVariant(false), sums.get(name)!, z)
    );
    const baseline = names[0] ?? "a";
    // More than one comparison with the same baseline: each at alpha / comparisons.
    const comparisons = Math.max(1, names.length - 1);
    const verdicts = names.slice(1).map((name) =>
      verdict(
        name,
        baseline,
        sums.get(baseline) ?? sessionSums(undefined),
        sums.get(name)!,
        alpha / comparisons,
        power,
      )
    );
    return { baseline, variants, verdicts };
  }

  /** What {@linkcode guardrailBreaches} finds in the outcomes counted here. */
  breaches(variants: readonly string[], margins: GuardrailMargins): GuardrailBreach[] {
    return breachesOf(this.#data, variants, margins);
  }

  #session(variant: string, sessionId: string): SessionFigures {
    let v = this.#data.get(variant);
    if (!v) this.#data.set(variant, v = emptyVariant(this.#bucketed));
    let s = v.sessions.get(sessionId);
    if (!s) {
      s = {
        requests: 0,
        errors: 0,
        parseFailures: 0,
        feedback: 0,
        scores: 0,
        scoreSum: 0,
        ttfds: 0,
        ttfdSum: 0,
      };
      v.sessions.set(sessionId, s);
    }
    return s;
  }

  /** Adds (`sign` 1) or takes away (−1) an outcome's figures. */
  #outcome(o: OutcomeRecord, sign: 1 | -1): void {
    const s = this.#session(o.variant, o.sessionId);
    const v = this.#data.get(o.variant)!;
    s.requests += sign;
    if (!o.ok) {
      s.errors += sign;
      const code = o.errorCode ?? "internal";
      v.errors[code] = (v.errors[code] ?? 0) + sign;
      if (v.errors[code] <= 0) delete v.errors[code];
    } else {
      if (sign > 0) v.totals.add(o.totalMs);
      else v.totals.remove(o.totalMs);
      if (o.ttfdMs !== undefined) {
        if (sign > 0) v.ttfds.add(o.ttfdMs);
        else v.ttfds.remove(o.ttfdMs);
        s.ttfds += sign;
        // Back to exactly 0 with none left, so that no rounding of the removals lingers.
        s.ttfdSum = s.ttfds === 0 ? 0 : s.ttfdSum + sign * o.ttfdMs;
      }
    }
    if (o.parseFailed) s.parseFailures += sign;
    v.tokensIn += sign * o.tokensIn;
    v.tokensOut += sign * o.tokensOut;
  }

  /** Adds or takes away the feedback of a request for the variant that answered it. */
  #rated(entry: RequestEntry, sign: 1 | -1): void {
    if (entry.variant === undefined) return;
    for (const f of entry.feedback) this.#feedback(entry.variant, f, sign);
  }

  #feedback(variant: string, f: SessionFeedback, sign: 1 | -1): void {
    const s = this.#session(variant, f.sessionId);
    s.feedback += sign;
    if (typeof f.score === "number" && Number.isFinite(f.score)) {
      s.scores += sign;
      s.scoreSum = s.scores === 0 ? 0 : s.scoreSum + sign * f.score;
    }
    if (sign < 0) this.#prune(variant, f.sessionId);
  }

  /** Forgets a session with nothing left counted, and a variant with no session left. */
  #prune(variant: string, sessionId: string): void {
    const v = this.#data.get(variant);
    const s = v?.sessions.get(sessionId);
    if (!v || !s || s.requests > 0 || s.feedback > 0) return;
    v.sessions.delete(sessionId);
    if (v.sessions.size === 0) this.#data.delete(variant);
  }
}

/** The figures of every variant, and each one's verdict against the baseline. */
export function experimentFigures(
  outcomes: readonly OutcomeRecord[],
  feedback: readonly SessionFeedback[],
  options: ExperimentStatsOptions = {},
): ExperimentFigures {
  const tally = new ExperimentTally();
  for (const o of outcomes) tally.addOutcome(o);
  for (const f of feedback) tally.addFeedback(f);
  return tally.figures(options);
}

/** Durations below this many milliseconds have a bucket each in a {@linkcode DurationHistogram}. */
const EXACT_BELOW_MS = 1024;
/** Buckets per doubling above that: each spans 2^(1/64), about 1.09%. */
const STEPS_PER_DOUBLING = 64;
/** Doublings above 1,024 ms covered (to 2^31 ms, 24 days); longer ones fall in the last bucket. */
const DOUBLINGS = 21;

/**
 * The percentiles of durations in milliseconds from fixed buckets, as a
 * Prometheus histogram keeps them but finer: one bucket per millisecond below
 * 1,024 ms (a percentile there is what {@linkcode percentile} gives on every
 * value, which it rounds to the millisecond), then 64 per doubling, each
 * answered by its geometric middle (within 0.55% of every value in it).
 * Memory and a percentile's cost are fixed (2,368 buckets), whatever the count.
 */
export class DurationHistogram implements DurationSample {
  readonly #counts = new Uint32Array(EXACT_BELOW_MS + STEPS_PER_DOUBLING * DOUBLINGS);
  #count = 0;

  add(ms: number): void {
    this.#counts[this.#bucket(ms)]++;
    this.#count++;
  }

  remove(ms: number): void {
    const bucket = this.#bucket(ms);
    if (this.#counts[bucket] === 0) return;
    this.#counts[bucket]--;
    this.#count--;
  }

  /** The value at rank ⌊q·n⌋ of the n held, as {@linkcode percentile} picks it. */
  percentile(q: number): number | null {
    if (this.#count === 0) return null;
    const rank = Math.min(this.#count - 1, Math.floor(q * this.#count));
    let seen = 0;
    for (let bucket = 0; bucket < this.#counts.length; bucket++) {
      seen += this.#counts[bucket];
      if (seen > rank) return this.#value(bucket);
    }
    return null;
  }

  #bucket(ms: number): number {
    const rounded = Math.round(ms);
    if (!(rounded > 0)) return 0;
    if (rounded < EXACT_BELOW_MS) return rounded;
    const step = Math.floor(STEPS_PER_DOUBLING * Math.log2(rounded / EXACT_BELOW_MS));
    return Math.min(this.#counts.length - 1, EXACT_BELOW_MS + step);
  }

  #value(bucket: number): number {
    if (bucket < EXACT_BELOW_MS) return bucket;
    const low = EXACT_BELOW_MS * 2 ** ((bucket - EXACT_BELOW_MS) / STEPS_PER_DOUBLING);
    return Math.round(low * 2 ** (0.5 / STEPS_PER_DOUBLING));
  }
}

/** Every duration, for exact percentiles (the report's). */
class ExactDurations implements DurationSample {
  readonly #values: number[] = [];

  add(ms: number): void {
    this.#values.push(ms);
  }

  remove(ms: number): void {
    const at = this.#values.indexOf(ms);
    if (at >= 0) this.#values.splice(at, 1);
  }

  percentile(q: number): number | null {
    return percentile(this.#values, q);
  }
}

function emptyVariant(bucketed: boolean): VariantData {
  const durations = () => bucketed ? new DurationHistogram() : new ExactDurations();
  return {
    sessions: new Map(),
    errors: {},
    ttfds: durations(),
    totals: durations(),
    tokensIn: 0,
    tokensOut: 0,
  };
}

/** What a rate counts, summed over a variant's sessions: Σc, Σc², Σc·r (r: a session's requests). */
interface RateSums {
  readonly x: number;
  readonly xx: number;
  readonly xr: number;
}

/**
 * A variant's sessions summed in one pass: what every interval of the figures
 * needs (the design effects from sums of squares, the per-session means for
 * the t intervals).
 */
interface SessionSums {
  /** Sessions. */
  readonly k: number;
  /** Requests (Σr) and Σr². */
  readonly n: number;
  readonly rr: number;
  readonly errors: RateSums;
  readonly parseFailures: RateSums;
  readonly feedback: RateSums;
  /** Requests of each session with turns. */
  readonly turns: readonly number[];
  /** Mean score of each session with a scored rating. */
  readonly scored: readonly number[];
  /** Mean time to first delta of each session with one. */
  readonly ttfds: readonly number[];
}

function sessionSums(v: VariantData | undefined): SessionSums {
  let n = 0;
  let rr = 0;
  const errors = { x: 0, xx: 0, xr: 0 };
  const parseFailures = { x: 0, xx: 0, xr: 0 };
  const feedback = { x: 0, xx: 0, xr: 0 };
  const add = (sums: { x: number; xx: number; xr: number }, c: number, r: number) => {
    sums.x += c;
    sums.xx += c * c;
    sums.xr += c * r;
  };
  const turns: number[] = [];
  const scored: number[] = [];
  const ttfds: number[] = [];
  for (const s of v?.sessions.values() ?? []) {
    n += s.requests;
    rr += s.requests * s.requests;
    add(errors, s.errors, s.requests);
    add(parseFailures, s.parseFailures, s.requests);
    add(feedback, s.feedback, s.requests);
    if (s.requests > 0) turns.push(s.requests);
    if (s.scores > 0) scored.push(s.scoreSum / s.scores);
    if (s.ttfds > 0) ttfds.push(s.ttfdSum / s.ttfds);
  }
  return { k: v?.sessions.size ?? 0, n, rr, errors, parseFailures, feedback, turns, scored, ttfds };
}

function variantFigures(
  name: string,
  v: VariantData,
  sums: SessionSums,
  z: number,
): VariantFigures {
  return {
    name,
    sessions: sums.turns.length,
    requests: sums.n,
    answered: sums.n - sums.errors.x,
    errors: { ...v.errors },
    errorRate: clusteredWilson(sums, sums.errors, z),
    ttfdMs: durations(v.ttfds, sums.ttfds, z),
    totalMs: durations(v.totals, [], z),
    tokensIn: v.tokensIn,
    tokensOut: v.tokensOut,
    parseFailures: sums.parseFailures.x,
    parseFailureRate: clusteredWilson(sums, sums.parseFailures, z),
    turnsPerSession: meanInterval(sums.turns, z),
    feedback: sums.feedback.x,
    feedbackRate: clusteredWilson(sums, sums.feedback, z),
    scoredSessions: sums.scored.length,
    meanScore: meanInterval(sums.scored, z),
  };
}

/** p50 and p95 of the requests' times; the mean over sessions of `perSession`, if given. */
function durations(
  values: DurationSample,
  perSession: readonly number[],
  z: number,
): DurationFigures {
  return {
    p50: values.percentile(0.5),
    p95: values.percentile(0.95),
    mean: perSession.length > 0 ? meanInterval(perSession, z) : null,
  };
}

/** The verdict of `variant` against `baseline`. */
function verdict(
  name: string,
  baselineName: string,
  a: SessionSums,
  b: SessionSums,
  alpha: number,
  power: number,
): Verdict {
  const z = normalQuantile(1 - alpha / 2);
  const zPower = normalQuantile(power);
  const scoresA = a.scored;
  const scoresB = b.scored;
  let metric: VerdictMetric;
  let difference: Interval;
  /** Per-session variances of each side, and their session counts, for the sample size. */
  let sides: { varA: number; varB: number; nA: number; nB: number };
  if (scoresA.length >= MIN_SCORED_SESSIONS && scoresB.length >= MIN_SCORED_SESSIONS) {
    metric = "feedback_score";
    difference = welchDifference(scoresA, scoresB, alpha);
    sides = {
      varA: variance(scoresA),
      varB: variance(scoresB),
      nA: scoresA.length,
      nB: scoresB.length,
    };
  } else {
    metric = "error_rate";
    difference = rateDifference(a, b, (s) => s.errors, z);
    const pooled = a.n + b.n === 0 ? 0 : (a.errors.x + b.errors.x) / (a.n + b.n);
    const perSession = (sums: SessionSums) => {
      if (sums.n === 0) return 0;
      // A session's share of the variance: p(1-p) times the design effect, per its mean turns.
      return pooled * (1 - pooled) * designEffect(sums, sums.errors) * sums.n / sums.k;
    };
    sides = { varA: perSession(a), varB: perSession(b), nA: a.k, nB: b.k };
  }
  // Lower is better for the error rate, higher for the feedback score.
  const better = metric === "feedback_score" ? difference.low > 0 : difference.high < 0;
  const worse = metric === "feedback_score" ? difference.high < 0 : difference.low > 0;
  if (better || worse) {
    return {
      variant: name,
      baseline: baselineName,
      metric,
      difference,
      outcome: better ? "better" : "worse",
      text: `${name} ${better ? "better" : "worse"}`,
    };
  }
  const moreSessions = sessionsNeeded(difference.value, sides, z + zPower);
  return {
    variant: name,
    baseline: baselineName,
    metric,
    difference,
    outcome: "no_difference",
    ...(moreSessions !== undefined && { moreSessions }),
    text: moreSessions === undefined
      ? "no difference yet (no difference seen to size a test on)"
      : `no difference yet, about ${moreSessions} more sessions needed`,
  };
}

/**
 * Sessions (both sides together, in their current proportion) still needed
 * for an interval of `zSum` = z(1-α/2) + z(power) standard errors to
 * separate `effect` from zero; undefined when no effect was seen.
 */
export function sessionsNeeded(
  effect: number,
  sides: { varA: number; varB: number; nA: number; nB: number },
  zSum: number,
): number | undefined {
  if (effect === 0 || !Number.isFinite(effect) || sides.nA === 0 || sides.nB === 0) {
    return undefined;
  }
  const ratio = sides.nB / sides.nA;
  const nA = (zSum * zSum * (sides.varA + sides.varB / ratio)) / (effect * effect);
  const total = nA * (1 + ratio);
  return Math.max(1, Math.ceil(total - sides.nA - sides.nB));
}

/**
 * The design effect of a rate over a variant's sessions: the ratio
 * estimator's variance with sessions as clusters, over the binomial variance;
 * at least 1. Its sum of squares Σ(c − p·r)² is expanded into the sums kept
 * (Σc² − 2p·Σc·r + p²·Σr²), all integers.
 */
function designEffect(sums: SessionSums, rate: RateSums): number {
  const { k, n } = sums;
  if (k < 2 || n === 0) return 1;
  const p = rate.x / n;
  if (p === 0 || p === 1) return 1;
  const squares = Math.max(0, rate.xx - 2 * p * rate.xr + p * p * sums.rr);
  const clustered = (squares / (n * n)) * (k / (k - 1));
  return Math.max(1, clustered / (p * (1 - p) / n));
}

/** The Wilson interval of a rate over a variant's requests, per its design effect. */
function clusteredWilson(sums: SessionSums, rate: RateSums, z: number): Interval {
  return wilson(rate.x, sums.n, z, designEffect(sums, rate));
}

/**
 * The Wilson score interval of `x` in `n`, with the sample taken as
 * `n / designEffect` independent trials.
 */
export function wilson(x: number, n: number, z: number, designEffect = 1): Interval {
  if (n === 0) return { value: 0, low: 0, high: 1 };
  const p = x / n;
  const m = n / designEffect;
  const z2 = z * z;
  const center = (p + z2 / (2 * m)) / (1 + z2 / m);
  const half = (z / (1 + z2 / m)) * Math.sqrt((p * (1 - p)) / m + z2 / (4 * m * m));
  return { value: p, low: Math.max(0, center - half), high: Math.min(1, center + half) };
}

/**
 * The Agresti–Caffo interval of rate(b) − rate(a), each side's variance
 * widened by its design effect.
 */
function rateDifference(
  a: SessionSums,
  b: SessionSums,
  count: (s: SessionSums) => RateSums,
  z: number,
): Interval {
  const side = (sums: SessionSums) => {
    const { n } = sums;
    const { x } = count(sums);
    const adjusted = (x + 1) / (n + 2);
    return {
      p: n === 0 ? 0 : x / n,
      adjusted,
      variance: (adjusted * (1 - adjusted) * designEffect(sums, count(sums))) / (n + 2),
    };
  };
  const sa = side(a);
  const sb = side(b);
  const center = sb.adjusted - sa.adjusted;
  const half = z * Math.sqrt(sa.variance + sb.variance);
  // Two rates differ by at most 1 either way.
  return {
    value: sb.p - sa.p,
    low: Math.max(-1, center - half),
    high: Math.min(1, center + half),
  };
}

/** Welch's interval of mean(b) − mean(a), at two-sided level `alpha`. */
export function welchDifference(
  a: readonly number[],
  b: readonly number[],
  alpha: number,
): Interval {
  const value = mean(b) - mean(a);
  if (a.length < 2 || b.length < 2) return { value, low: -Infinity, high: Infinity };
  const va = variance(a) / a.length;
  const vb = variance(b) / b.length;
  const se = Math.sqrt(va + vb);
  if (se === 0) return { value, low: value, high: value };
  const df = (va + vb) ** 2 / (va ** 2 / (a.length - 1) + vb ** 2 / (b.length - 1));
  const half = tQuantile(1 - alpha / 2, df) * se;
  return { value, low: value - half, high: value + half };
}

/** The mean of `values` with its t interval (the level of `z`); null with no values. */
function meanInterval(values: readonly number[], z: number): Interval | null {
  if (values.length === 0) return null;
  const m = mean(values);
  if (values.length < 2) return { value: m, low: -Infinity, high: Infinity };
  const level = normalCdf(z);
  const half = tQuantile(level, values.length - 1) * Math.sqrt(variance(values) / values.length);
  return { value: m, low: m - half, high: m + half };
}

function sum(values: readonly number[]): number {
  let total = 0;
  for (const v of values) total += v;
  return total;
}

function mean(values: readonly number[]): number {
  return values.length === 0 ? 0 : sum(values) / values.length;
}

/** The sample variance (n − 1). */
function variance(values: readonly number[]): number {
  if (values.length < 2) return 0;
  const m = mean(values);
  let squares = 0;
  for (const v of values) squares += (v - m) ** 2;
  return squares / (values.length - 1);
}

/** The standard normal distribution function (Zelen & Severo 26.2.17, error below 7.5e-8). */
export function normalCdf(x: number): number {
  const t = 1 / (1 + 0.2316419 * Math.abs(x));
  const d = 0.3989422804014327 * Math.exp((-x * x) / 2);
  const tail = d * t *
    (0.319381530 + t * (-0.356563782 + t * (1.781477937 + t * (-1.821255978 + t * 1.330274429))));
  return x >= 0 ? 1 - tail : tail;
}

/** The standard normal quantile (Acklam's rational approximation, relative error below 1.2e-9). */
export function normalQuantile(p: number): number {
  if (p <= 0) return -Infinity;
  if (p >= 1) return Infinity;
  const a = [
    -39.69683028665376,
    220.9460984245205,
    -275.9285104469687,
    138.357751867269,
    -30.66479806614716,
    2.506628277459239,
  ];
  const b = [
    -54.47609879822406,
    161.5858368580409,
    -155.6989798598866,
    66.80131188771972,
    -13.28068155288572,
  ];
  const c = [
    -0.007784894002430293,
    -0.3223964580411365,
    -2.400758277161838,
    -2.549732539343734,
    4.374664141464968,
    2.938163982698783,
  ];
  const d = [0.007784695709041462, 0.3224671290700398, 2.445134137142996, 3.754408661907416];
  const low = 0.02425;
  if (p < low) {
    const q = Math.sqrt(-2 * Math.log(p));
    return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
      ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
  }
  if (p > 1 - low) return -normalQuantile(1 - p);
  const q = p - 0.5;
  const r = q * q;
  return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
    (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1);
}

/**
 * Student's t quantile with `df` degrees of freedom (Cornish–Fisher
 * expansion about the normal quantile: within 0.5% from 3 degrees of freedom
 * on, exact in the limit).
 */
export function tQuantile(p: number, df: number): number {
  const z = normalQuantile(p);
  if (!Number.isFinite(df) || df > 1e7) return z;
  const z3 = z ** 3;
  const z5 = z ** 5;
  const z7 = z ** 7;
  return z + (z3 + z) / (4 * df) + (5 * z5 + 16 * z3 + 3 * z) / (96 * df ** 2) +
    (3 * z7 + 19 * z5 + 17 * z3 - 15 * z) / (384 * df ** 3);
}

/** Margins of {@linkcode guardrailBreaches}. */
export interface GuardrailMargins {
  /** How much higher than the baseline's a variant's error rate may be (0.05: 5 points). */
  readonly errorRate: number;
  /** How much slower than the baseline's its mean time to first delta may be (0.5: half). */
  readonly ttfd: number;
  /** Sessions each side needs before it is judged at all. */
  readonly minSessions: number;
  /** One-sided significance level of the tests. @default {0.05} */
  readonly alpha?: number;
}

/** A variant found worse than the baseline beyond a margin. */
export interface GuardrailBreach {
  readonly variant: string;
  readonly metric: "error_rate" | "ttfd";
  /** Why, in words, with the figures. */
  readonly reason: string;
}

/**
 * The variants (all but the baseline, `variants[0]`) whose error rate or mean
 * time to first delta is worse than the baseline's by more than its margin
 * with one-sided confidence 1 − alpha: the lower bound of the difference's
 * interval (Agresti–Caffo for the rate, Welch over per-session means for the
 * time) is beyond the margin. A raw threshold would stop a variant for a few
 * unlucky sessions; this stops it only once the sessions show it.
 */
export function guardrailBreaches(
  outcomes: readonly OutcomeRecord[],
  variants: readonly string[],
  margins: GuardrailMargins,
): GuardrailBreach[] {
  const tally = new ExperimentTally();
  for (const o of outcomes) tally.addOutcome(o);
  return tally.breaches(variants, margins);
}

/** {@linkcode guardrailBreaches} on each variant's sessions. */
function breachesOf(
  data: ReadonlyMap<string, VariantData>,
  variants: readonly string[],
  margins: GuardrailMargins,
): GuardrailBreach[] {
  const alpha = margins.alpha ?? 0.05;
  const z = normalQuantile(1 - alpha);
  const baseline = data.get(variants[0]);
  if (!baseline || baseline.sessions.size < margins.minSessions) return [];
  const breaches: GuardrailBreach[] = [];
  const a = sessionSums(baseline);
  const rate = (sums: SessionSums) => sums.n === 0 ? 0 : sums.errors.x / sums.n;
  for (const name of variants.slice(1)) {
    const v = data.get(name);
    if (!v || v.sessions.size < margins.minSessions) continue;
    const b = sessionSums(v);
    const errors = rateDifference(a, b, (s) => s.errors, z);
    if (errors.low > margins.errorRate) {
      breaches.push({
        variant: name,
        metric: "error_rate",
        reason: `error rate ${percent(rate(b))} against the baseline's ` +
          `${percent(rate(a))} (${b.k} and ${a.k} sessions): ` +
          `more than ${percent(margins.errorRate)} worse at ${percent(1 - alpha)} confidence`,
      });
      continue;
    }
    const ttfdA = a.ttfds;
    const ttfdB = b.ttfds;
    if (ttfdA.length < margins.minSessions || ttfdB.length < margins.minSessions) continue;
    const slower = welchDifference(ttfdA, ttfdB, 2 * alpha);
    if (slower.low > margins.ttfd * mean(ttfdA)) {
      breaches.push({
        variant: name,
        metric: "ttfd",
        reason: `time to first delta ${Math.round(mean(ttfdB))} ms against the baseline's ` +
          `${Math.round(mean(ttfdA))} ms (${ttfdB.length} and ${ttfdA.length} sessions): ` +
          `more than ${percent(margins.ttfd)} slower at ${percent(1 - alpha)} confidence`,
      });
    }
  }
  return breaches;
}

function percent(share: number): string {
  return `${Math.round(share * 1000) / 10}%`;
}
