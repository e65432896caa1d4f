/**
 * Request statistics, reported every `--stats-interval`: requests, errors by
 * code, error rate and latency percentiles over the interval, plus gauges
 * (queue depth, in flight, live sessions) read at report time.
 *
 * @module
 */

import type { ErrorCode } from "./protocol/errors.ts";

/** Gauges sampled when a report is made. */
export interface Gauges {
  readonly queued: number;
  readonly inFlight: number;
  readonly liveSessions: number;
}

/** One statistics report, as published on `{service}/stats`. */
export interface StatsReport extends Gauges {
  readonly interval_s: number;
  readonly requests: number;
  readonly answered: number;
  readonly errors: Readonly<Partial<Record<ErrorCode, number>>>;
  readonly error_rate: number;
  readonly latency_ms: { readonly avg: number; readonly p50: number; readonly p95: number } | null;
  readonly rejected_unaddressable: number;
  readonly totals: {
    readonly requests: number;
    readonly answered: number;
    readonly errors: number;
  };
}

/** Counts requests and outcomes; {@linkcode report} returns and resets the interval's figures. */
export class Stats {
  #since = performance.now();
  #requests = 0;
  #answered = 0;
  #errors: Partial<Record<ErrorCode, number>> = {};
  #latencies: number[] = [];
  #unaddressable = 0;
  #totalRequests = 0;
  #totalAnswered = 0;
  #totalErrors = 0;

  /** A request was received (valid or not). */
  request(): void {
    this.#requests++;
    this.#totalRequests++;
  }

  /** A request was answered with a `done`, after `latencyMs`. */
  answered(latencyMs: number): void {
    this.#answered++;
    this.#totalAnswered++;
    // Bounded: beyond 100k samples an interval keeps every other one.
    if (this.#latencies.length >= 100_000) {
      this.#latencies = this.#latencies.filter((_, i) => i % 2 === 0);
    }
    this.#latencies.push(latencyMs);
  }

  /** A request ended in an error reply. */
  error(code: ErrorCode): void {
    this.#errors[code] = (this.#errors[code] ?? 0) + 1;
    this.#totalErrors++;
  }

  /** A message that could not be answered (no session to address it to). */
  unaddressable(code: ErrorCode): void {
    this.#unaddressable++;
    this.error(code);
  }

  /** Everything counted since the last report; starts a new interval. */
  report(gauges: Gauges): StatsReport {
    const now = performance.now();
    const errors = Object.values(this.#errors).reduce((a, b) => a + b, 0);
    const sorted = this.#latencies.sort((a, b) => a - b);
    const pick = (q: number) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
    const report: StatsReport = {
      interval_s: Math.round((now - this.#since) / 100) / 10,
      requests: this.#requests,
      answered: this.#answered,
      errors: this.#errors,
      error_rate: this.#requests === 0 ? 0 : Math.round((errors / this.#requests) * 1e4) / 1e4,
      latency_ms: sorted.length === 0 ? null : {
        avg: Math.round(sorted.reduce((a, b) => a + b, 0) / sorted.length),
        p50: Math.round(pick(0.5)),
        p95: Math.round(pick(0.95)),
      },
      rejected_unaddressable: this.#unaddressable,
      totals: {
        requests: this.#totalRequests,
        answered: this.#totalAnswered,
        errors: this.#totalErrors,
      },
      ...gauges,
    };
    this.#since = now;
    this.#requests = 0;
    this.#answered = 0;
    this.#errors = {};
    this.#latencies = [];
    this.#unaddressable = 0;
    return report;
  }
}
