/**
 * Request statistics, in two views: a report every `--stats-interval`
 * (requests, errors by code, error rate and latency percentiles over the
 * interval, plus gauges read at report time), and cumulative Prometheus
 * metrics for `/metrics`.
 *
 * @module
 */

import type { ErrorCode, Usage } from "../protocol/mod.ts";
import {
  Counter,
  Gauge,
  Histogram,
  LabelledGauge,
  type Metric,
  renderMetrics,
  SECONDS_BUCKETS,
} from "./prometheus.ts";

/** Gauges sampled when a report is made or metrics are scraped. */
export interface Gauges {
  readonly queued: number;
  readonly inFlight: number;
  readonly liveSessions: number;
  /** Whether requests can reach the engine (the circuit is closed). */
  readonly engineReady: boolean;
  /** Restarts of a managed engine, by cause. */
  readonly engineRestarts: Readonly<Record<string, number>>;
  /**
   * Each engine, when there are several (each then labelled `engine` in `/metrics`).
   * @default {undefined}
   */
  readonly engines?: readonly EngineGauges[];
}

/** One engine of several, as `/metrics`, `/status` and the live page show it. */
export interface EngineGauges {
  /** `e0`, `e1`, ... */
  readonly id: string;
  /** Its base URL. */
  readonly url: string;
  /** `ready`: its circuit is closed; `down`: open; `gave_up`: a managed engine out for good. */
  readonly state: "ready" | "down" | "gave_up";
  /** Turns this service has running there. */
  readonly inFlight: number;
  /** Requests waiting in its queue, as its `/metrics` said last (absent: it does not say). */
  readonly waiting?: number;
  /** Its prefix cache's hit rate since it started (hits over queries, from its `/metrics`). */
  readonly prefixHitRate?: number;
  /** Sessions whose home it is. */
  readonly sessions: number;
  /** Turns sent there, and those it failed. */
  readonly turns: number;
  readonly errors: number;
  /** Prompt tokens sent there that it was expected not to hold (prefilled anew). */
  readonly uncachedTokens: number;
  /** Times its circuit opened. */
  readonly outages: number;
  /** Restarts of it (a managed engine), by cause. */
  readonly restarts: Readonly<Record<string, number>>;
  /** Routing decisions that sent a turn there, by reason (home, new, moved_for_load, rehomed). */
  readonly decisions: Readonly<Record<string, number>>;
}

/** One statistics report, as published on `{service}/stats`. */
export interface StatsReport {
  readonly interval_s: number;
  readonly requests: number;
  readonly answered: number;
  readonly errors: Readonly<Partial<Record<ErrorCode, number>>>;
  readonly error_rate: number;
  readonly latency_ms: { readonly avg: number; readonly p50: number; readonly p95: number } | null;
  readonly rejected_unaddressable: number;
  /** Messages deliberately not acted on, by reason. */
  readonly ignored: Readonly<Partial<Record<IgnoredReason, number>>>;
  readonly queued: number;
  readonly in_flight: number;
  readonly live_sessions: number;
  readonly engine: {
    readonly ready: boolean;
    readonly restarts: Readonly<Record<string, number>>;
  };
  /** Reconnections to the broker since start (not reset by a report). */
  readonly broker_reconnects: number;
  /** Counts since start. */
  readonly totals: {
    readonly requests: number;
    readonly answered: number;
    readonly errors: number;
  };
}

/**
 * Why a message was not acted on: `retained` (a stale message the broker
 * replays at subscription), `duplicate` (a copy of a request already taken),
 * `superseded` (a game state replaced by a newer one of its session before it ran).
 */
export type IgnoredReason = "retained" | "duplicate" | "superseded" | "unsubscribed";

/**
 * How long an answered request took, in milliseconds from its arrival, as
 * measured (not rounded): the reply carries them rounded, as `ReplyTiming`.
 */
export interface RequestDurations {
  readonly queueMs: number;
  readonly ttftMs: number | null;
  readonly totalMs: number;
}

/**
 * The metrics of each engine, labelled `engine`, when there are several (none with one: the
 * service's own metrics say it all).
 */
function engineMetrics(read: () => readonly EngineGauges[] | undefined): Metric[] {
  const each = (name: string, help: string, value: (engine: EngineGauges) => number | undefined) =>
    new LabelledGauge(name, help, () =>
      (read() ?? []).flatMap((engine) => {
        const v = value(engine);
        return v === undefined ? [] : [{ labels: { engine: engine.id }, value: v }];
      }));
  const counted = (
    name: string,
    help: string,
    add: (counter: Counter, e: EngineGauges) => void,
  ) => ({
    render: () => {
      const counter = new Counter(name, help);
      for (const engine of read() ?? []) add(counter, engine);
      return counter.render();
    },
  });
  const present = () => (read()?.length ?? 0) > 0;
  const metrics: Metric[] = [
    each(
      "vllm_mqtt_engine_ready",
      "1 while the engine's circuit is closed",
      (e) => +(e.state === "ready"),
    ),
    each(
      "vllm_mqtt_engine_gave_up",
      "1 once a managed engine gave up for good",
      (e) => +(e.state === "gave_up"),
    ),
    each("vllm_mqtt_engine_in_flight", "Turns running on the engine", (e) => e.inFlight),
    each(
      "vllm_mqtt_engine_waiting",
      "Requests waiting in the engine's queue (its /metrics)",
      (e) => e.waiting,
    ),
    each(
      "vllm_mqtt_engine_prefix_cache_hit_rate",
      "The engine's prefix cache hits over queries since it started (its /metrics)",
      (e) => e.prefixHitRate,
    ),
    each("vllm_mqtt_engine_sessions", "Sessions whose home is the engine", (e) => e.sessions),
    counted(
      "vllm_mqtt_engine_turns_total",
      "Turns sent to the engine",
      (c, e) => c.inc({ engine: e.id }, e.turns),
    ),
    counted(
      "vllm_mqtt_engine_errors_total",
      "Turns the engine failed",
      (c, e) => c.inc({ engine: e.id }, e.errors),
    ),
    counted(
      "vllm_mqtt_engine_uncached_tokens_total",
      "Prompt tokens sent to the engine that it was expected not to hold",
      (c, e) => c.inc({ engine: e.id }, e.uncachedTokens),
    ),
    counted(
      "vllm_mqtt_engine_outages_total",
      "Times the engine's circuit opened",
      (c, e) => c.inc({ engine: e.id }, e.outages),
    ),
    counted(
      "vllm_mqtt_route_decisions_total",
      "Turns routed to the engine, by reason (home, new, moved_for_load, rehomed)",
      (c, e) => {
        for (const [reason, n] of Object.entries(e.decisions)) c.inc({ engine: e.id, reason }, n);
      },
    ),
  ];
  // Not even the HELP lines with one engine: /metrics stays as it was.
  return metrics.map((metric) => ({ render: () => present() ? metric.render() : "" }));
}

/** One counted event, for a live view ({@linkcode Stats.watch}); counts and times only. */
export type StatsEvent =
  | { readonly kind: "answered"; readonly project: string; readonly timing: RequestDurations }
  | { readonly kind: "error"; readonly project: string | undefined; readonly code: ErrorCode }
  | { readonly kind: "ignored"; readonly reason: IgnoredReason }
  | { readonly kind: "reconnected" }
  | {
    readonly kind: "feedback";
    readonly project: string;
    readonly variant: string | undefined;
    readonly score: number | undefined;
  };

/** Options of {@linkcode Stats}. */
export interface StatsOptions {
  /**
   * The clock a report's interval is measured on, in milliseconds (tests).
   * @default {performance.now}
   */
  readonly now?: () => number;
}

/** Counts requests and outcomes. */
export class Stats {
  readonly #gauges: () => Gauges;
  readonly #now: () => number;
  readonly #watchers = new Set<(event: StatsEvent) => void>();
  #since: number;
  #requests = 0;
  #answered = 0;
  #errors: Partial<Record<ErrorCode, number>> = {};
  #latencies: number[] = [];
  #unaddressable = 0;
  #ignored: Partial<Record<IgnoredReason, number>> = {};
  #totalRequests = 0;
  #totalAnswered = 0;
  #totalErrors = 0;
  #brokerReconnects = 0;

  readonly #outcomes = new Counter(
    "vllm_mqtt_requests_total",
    "Requests by project and outcome (answered, or the error code)",
  );
  readonly #unanswerable = new Counter(
    "vllm_mqtt_unaddressable_total",
    "Messages that could not be answered (no session to reply to), by error code",
  );
  readonly #ignoredTotal = new Counter(
    "vllm_mqtt_ignored_total",
    "Messages not acted on, by reason (retained: replayed at subscription; duplicate: a copy)",
  );
  readonly #replyTopicsRefused = new Counter(
    "vllm_mqtt_reply_topics_refused_total",
    "Requests refused for naming a reply topic their sender may not read, by project",
  );
  readonly #queueWait = new Histogram(
    "vllm_mqtt_queue_wait_seconds",
    "Time from arrival to being sent to a worker",
    SECONDS_BUCKETS,
  );
  readonly #ttft = new Histogram(
    "vllm_mqtt_time_to_first_token_seconds",
    "Time from arrival to the first generated token",
    SECONDS_BUCKETS,
  );
  readonly #latency = new Histogram(
    "vllm_mqtt_request_duration_seconds",
    "Time from arrival to the final answer",
    SECONDS_BUCKETS,
  );
  readonly #promptTokens = new Counter(
    "vllm_mqtt_prompt_tokens_total",
    "Prompt tokens sent to the engine, by project",
  );
  readonly #generationTokens = new Counter(
    "vllm_mqtt_generation_tokens_total",
    "Tokens generated by the engine, by project",
  );
  readonly #reconnects = new Counter(
    "vllm_mqtt_broker_reconnects_total",
    "Reconnections to the MQTT broker",
  );
  readonly #feedback = new Counter(
    "vllm_mqtt_feedback_total",
    "Feedback records stored (each request's once), by project and experiment variant",
  );
  readonly #feedbackScores = new Counter(
    "vllm_mqtt_feedback_score_sum",
    "Sum of the scores (0 or more) of the stored feedback that has one, by project and variant",
  );
  readonly #feedbackScored = new Counter(
    "vllm_mqtt_feedback_scored_total",
    "Stored feedback that has a score, by project and variant (the mean's denominator)",
  );
  readonly #metrics: readonly Metric[];

  /** `gauges` is read at each report and scrape. */
  constructor(gauges: () => Gauges, options: StatsOptions = {}) {
    this.#gauges = gauges;
    this.#now = options.now ?? (() => performance.now());
    this.#since = this.#now();
    // A sample from the start: a counter with none until its first reconnect cannot be graphed
    // or alerted on (`increase()` sees nothing to increase from).
    this.#reconnects.inc({}, 0);
    const gauge = (name: string, help: string, read: (g: Gauges) => number) =>
      new Gauge(name, help, () => read(this.#gauges()));
    this.#metrics = [
      this.#outcomes,
      this.#unanswerable,
      this.#ignoredTotal,
      this.#replyTopicsRefused,
      this.#queueWait,
      this.#ttft,
      this.#latency,
      this.#promptTokens,
      this.#generationTokens,
      this.#feedback,
      this.#feedbackScores,
      this.#feedbackScored,
      gauge("vllm_mqtt_in_flight", "Requests being run", (g) => g.inFlight),
      gauge("vllm_mqtt_queue_depth", "Requests waiting in the queue", (g) => g.queued),
      gauge("vllm_mqtt_live_sessions", "Sessions with history", (g) => g.liveSessions),
      gauge("vllm_mqtt_engine_up", "1 while the engine takes requests", (g) => +g.engineReady),
      this.#reconnects,
      {
        render: () => {
          const restarts = new Counter(
            "vllm_mqtt_engine_restarts_total",
            "Restarts of the managed engine, by cause",
          );
          for (const [cause, n] of Object.entries(this.#gauges().engineRestarts)) {
            restarts.inc({ cause }, n);
          }
          return restarts.render();
        },
      },
      ...engineMetrics(() => this.#gauges().engines),
    ];
  }

  /** A request was received (valid or not). */
  request(): void {
    this.#requests++;
    this.#totalRequests++;
  }

  /** A request of `project` was answered with a `done`. */
  answered(project: string, timing: RequestDurations, usage: Usage | null): void {
    this.#answered++;
    this.#totalAnswered++;
    // Bounded: beyond 100k samples an interval keeps every other one.
    if (this.#latencies.length >= 100_000) {
      this.#latencies = this.#latencies.filter((_, i) => i % 2 === 0);
    }
    this.#latencies.push(timing.totalMs);
    this.#outcomes.inc({ project, outcome: "answered" });
    this.#queueWait.observe(timing.queueMs / 1000);
    if (timing.ttftMs !== null) this.#ttft.observe(timing.ttftMs / 1000);
    this.#latency.observe(timing.totalMs / 1000);
    if (usage) {
      this.#promptTokens.inc({ project }, usage.prompt_tokens);
      this.#generationTokens.inc({ project }, usage.completion_tokens);
    }
    this.#emit({ kind: "answered", project, timing });
  }

  /** A request of `project` ended in an error reply. */
  error(project: string, code: ErrorCode): void {
    this.#countError(code);
    this.#outcomes.inc({ project, outcome: code });
    this.#emit({ kind: "error", project, code });
  }

  /** A message that could not be answered (no session to address it to). */
  unaddressable(code: ErrorCode): void {
    this.#unaddressable++;
    this.#countError(code);
    this.#unanswerable.inc({ code });
    this.#emit({ kind: "error", project: undefined, code });
  }

  /**
   * A request of `project` named a reply topic its sender may not read (it is
   * also counted as its `forbidden` error reply).
   */
  replyTopicRefused(project: string): void {
    this.#replyTopicsRefused.inc({ project });
  }

  /** A message was deliberately not acted on. */
  ignored(reason: IgnoredReason): void {
    this.#ignored[reason] = (this.#ignored[reason] ?? 0) + 1;
    this.#ignoredTotal.inc({ reason });
    this.#emit({ kind: "ignored", reason });
  }

  /**
   * A feedback record was stored for a request of `project` (a repeat of its
   * request_id is not counted): its variant, if the project has an
   * experiment, and its score, if it has one.
   */
  feedback(project: string, variant: string | undefined, score: number | undefined): void {
    const labels = { project, variant: variant ?? "" };
    this.#feedback.inc(labels);
    if (score !== undefined) {
      this.#feedbackScores.inc(labels, score);
      this.#feedbackScored.inc(labels);
    }
    this.#emit({ kind: "feedback", project, variant, score });
  }

  /** The MQTT connection was re-established. */
  brokerReconnected(): void {
    this.#brokerReconnects++;
    this.#reconnects.inc();
    this.#emit({ kind: "reconnected" });
  }

  /** Calls `watcher` with each event from now on; returns what stops it. */
  watch(watcher: (event: StatsEvent) => void): () => void {
    this.#watchers.add(watcher);
    return () => this.#watchers.delete(watcher);
  }

  #emit(event: StatsEvent): void {
    for (const watcher of this.#watchers) watcher(event);
  }

  /** Cumulative metrics in Prometheus text format. */
  prometheus(): string {
    return renderMetrics(this.#metrics);
  }

  /** Everything counted since the last report; starts a new interval. */
  report(): StatsReport {
    const now = this.#now();
    const gauges = this.#gauges();
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
      ignored: this.#ignored,
      queued: gauges.queued,
      in_flight: gauges.inFlight,
      live_sessions: gauges.liveSessions,
      engine: { ready: gauges.engineReady, restarts: { ...gauges.engineRestarts } },
      broker_reconnects: this.#brokerReconnects,
      totals: {
        requests: this.#totalRequests,
        answered: this.#totalAnswered,
        errors: this.#totalErrors,
      },
    };
    this.#since = now;
    this.#requests = 0;
    this.#answered = 0;
    this.#errors = {};
    this.#latencies = [];
    this.#unaddressable = 0;
    this.#ignored = {};
    return report;
  }

  #countError(code: ErrorCode): void {
    this.#errors[code] = (this.#errors[code] ?? 0) + 1;
    this.#totalErrors++;
  }
}
