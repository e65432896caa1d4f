/**
 * The recent past, second by second, for the operator's live page: per
 * project, how many requests ended each second, how long they took and how
 * soon their first delta came, and errors by code. Counts and times only,
 * never what was said. Fed by {@linkcode Stats.watch}; bounded in memory (a
 * few minutes of one-second buckets, a bounded sample of times per bucket).
 *
 * @module
 */

import { percentile } from "../_util.ts";
import type { ErrorCode } from "../protocol/mod.ts";
import type { IgnoredReason, Stats, StatsEvent } from "./stats.ts";

/** What a page charts for one second. */
export interface LivePoint {
  /** The second, in Unix seconds. */
  readonly t: number;
  /** Requests that ended in that second (answered or failed), by project. */
  readonly requests: Readonly<Record<string, number>>;
  /** Of those, the ones that failed. */
  readonly errors: number;
  /** Latency percentiles of the answers of the last {@linkcode LiveStatsOptions.smoothS} seconds. */
  readonly p50_ms: number | null;
  readonly p95_ms: number | null;
  /** Median time to the first delta over the same seconds. */
  readonly ttft_p50_ms: number | null;
}

/** One project over the summary window. */
export interface ProjectSummary {
  readonly requests: number;
  readonly rps: number;
  readonly answered: number;
  readonly errors: number;
  readonly p50_ms: number | null;
  readonly p95_ms: number | null;
  readonly ttft_p50_ms: number | null;
  readonly ttft_p95_ms: number | null;
}

/** The last minute (by default), and the totals since start. */
export interface LiveSummary {
  readonly window_s: number;
  readonly projects: Readonly<Record<string, ProjectSummary>>;
  readonly errors: Readonly<Partial<Record<ErrorCode, number>>>;
  readonly totals: {
    readonly answered: number;
    readonly errors: Readonly<Partial<Record<ErrorCode, number>>>;
    readonly ignored: Readonly<Partial<Record<IgnoredReason, number>>>;
  };
  readonly broker_reconnects: number;
}

/** Options of {@linkcode LiveStats}. */
export interface LiveStatsOptions {
  /** Seconds of history kept for the charts. @default {300} */
  readonly historyS?: number;
  /** Seconds the charted percentiles are taken over. @default {10} */
  readonly smoothS?: number;
  /** Seconds the summary is taken over. @default {60} */
  readonly summaryS?: number;
  /** The clock, in milliseconds (tests). @default {Date.now} */
  readonly now?: () => number;
}

/** Times kept per project and second; beyond, a random sample of them. */
const SAMPLE = 256;

interface ProjectBucket {
  requests: number;
  answered: number;
  errors: number;
  latencies: number[];
  ttfts: number[];
}

interface Bucket {
  readonly projects: Map<string, ProjectBucket>;
  readonly errors: Map<ErrorCode, number>;
}

/** Per-second statistics of the last few minutes. */
export class LiveStats {
  readonly #historyS: number;
  readonly #smoothS: number;
  readonly #summaryS: number;
  readonly #now: () => number;
  readonly #buckets = new Map<number, Bucket>();
  readonly #projects: Set<string>;
  #answered = 0;
  readonly #errors: Partial<Record<ErrorCode, number>> = {};
  readonly #ignored: Partial<Record<IgnoredReason, number>> = {};
  #reconnects = 0;
  readonly #unwatch: () => void;

  /** Starts counting what `stats` sees; `projects` are listed even while idle. */
  constructor(stats: Stats, projects: readonly string[], options: LiveStatsOptions = {}) {
    this.#historyS = options.historyS ?? 300;
    this.#smoothS = options.smoothS ?? 10;
    this.#summaryS = options.summaryS ?? 60;
    this.#now = options.now ?? Date.now;
    this.#projects = new Set(projects);
    this.#unwatch = stats.watch((event) => this.#note(event));
  }

  /** Stops counting. */
  close(): void {
    this.#unwatch();
  }

  /** The current second, in Unix seconds. */
  get second(): number {
    return Math.floor(this.#now() / 1000);
  }

  /** The point of one second (best asked once it is over). */
  point(t: number): LivePoint {
    const requests: Record<string, number> = {};
    for (const project of this.#projects) requests[project] = 0;
    let errors = 0;
    const bucket = this.#buckets.get(t);
    for (const [project, b] of bucket?.projects ?? []) {
      requests[project] = b.requests;
      errors += b.errors;
    }
    const latencies: number[] = [];
    const ttfts: number[] = [];
    for (let s = t - this.#smoothS + 1; s <= t; s++) {
      for (const b of this.#buckets.get(s)?.projects.values() ?? []) {
        latencies.push(...b.latencies);
        ttfts.push(...b.ttfts);
      }
    }
    return {
      t,
      requests,
      errors,
      p50_ms: percentile(latencies, 0.5),
      p95_ms: percentile(latencies, 0.95),
      ttft_p50_ms: percentile(ttfts, 0.5),
    };
  }

  /** The points of the seconds kept, up to the last full one, oldest first. */
  history(): LivePoint[] {
    const last = this.second - 1;
    const points: LivePoint[] = [];
    for (let t = last - this.#historyS + 1; t <= last; t++) points.push(this.point(t));
    return points;
  }

  /** Per project over the last `summaryS` full seconds, and totals since start. */
  summary(): LiveSummary {
    this.#prune();
    const last = this.second - 1;
    const projects: Record<string, ProjectSummary> = {};
    const errors: Partial<Record<ErrorCode, number>> = {};
    const names = new Set(this.#projects);
    const gathered = new Map<string, ProjectBucket>();
    for (let t = last - this.#summaryS + 1; t <= last; t++) {
      const bucket = this.#buckets.get(t);
      if (!bucket) continue;
      for (const [code, n] of bucket.errors) errors[code] = (errors[code] ?? 0) + n;
      for (const [project, b] of bucket.projects) {
        names.add(project);
        const into = gathered.get(project) ?? emptyProject();
        gathered.set(project, into);
        into.requests += b.requests;
        into.answered += b.answered;
        into.errors += b.errors;
        into.latencies.push(...b.latencies);
        into.ttfts.push(...b.ttfts);
      }
    }
    for (const project of names) {
      const b = gathered.get(project) ?? emptyProject();
      projects[project] = {
        requests: b.requests,
        rps: Math.round((b.requests / this.#summaryS) * 100) / 100,
        answered: b.answered,
        errors: b.errors,
        p50_ms: percentile(b.latencies, 0.5),
        p95_ms: percentile(b.latencies, 0.95),
        ttft_p50_ms: percentile(b.ttfts, 0.5),
        ttft_p95_ms: percentile(b.ttfts, 0.95),
      };
    }
    return {
      window_s: this.#summaryS,
      projects,
      errors,
      totals: {
        answered: this.#answered,
        errors: { ...this.#errors },
        ignored: { ...this.#ignored },
      },
      broker_reconnects: this.#reconnects,
    };
  }

  #note(event: StatsEvent): void {
    switch (event.kind) {
      case "reconnected":
        this.#reconnects++;
        return;
      case "ignored":
        this.#ignored[event.reason] = (this.#ignored[event.reason] ?? 0) + 1;
        return;
      case "answered": {
        this.#answered++;
        const b = this.#project(event.project);
        b.requests++;
        b.answered++;
        sample(b.latencies, event.timing.totalMs);
        if (event.timing.ttftMs !== null) sample(b.ttfts, event.timing.ttftMs);
        return;
      }
      case "error": {
        this.#errors[event.code] = (this.#errors[event.code] ?? 0) + 1;
        const bucket = this.#bucket();
        bucket.errors.set(event.code, (bucket.errors.get(event.code) ?? 0) + 1);
        // A message that named no project is counted among the errors only.
        if (event.project === undefined) return;
        const b = this.#project(event.project);
        b.requests++;
        b.errors++;
        return;
      }
    }
  }

  #bucket(): Bucket {
    const t = this.second;
    let bucket = this.#buckets.get(t);
    if (!bucket) {
      bucket = { projects: new Map(), errors: new Map() };
      this.#buckets.set(t, bucket);
      this.#prune();
    }
    return bucket;
  }

  #project(project: string): ProjectBucket {
    const bucket = this.#bucket();
    let b = bucket.projects.get(project);
    if (!b) {
      b = emptyProject();
      bucket.projects.set(project, b);
    }
    return b;
  }

  #prune(): void {
    const oldest = this.second - Math.max(this.#historyS, this.#summaryS) - this.#smoothS;
    for (const t of this.#buckets.keys()) if (t < oldest) this.#buckets.delete(t);
  }
}

function emptyProject(): ProjectBucket {
  return { requests: 0, answered: 0, errors: 0, latencies: [], ttfts: [] };
}

/** Keeps up to {@linkcode SAMPLE} values, a uniform sample beyond that. */
function sample(values: number[], value: number): void {
  if (values.length < SAMPLE) values.push(value);
  else values[Math.floor(Math.random() * SAMPLE)] = value;
}
