/**
 * The service's view of its running experiments: every turn of a project with
 * variants ends here ({@linkcode ExperimentMonitor.turnEnded}), and is
 * counted per variant in `/metrics`, stored (`outcome_log.ts`), and kept in
 * memory for the live page's experiment panel and the guardrail, which both
 * take their figures from `experiment_stats.ts` as the report does.
 *
 * The in-memory outcomes and feedback start with what the store holds of the
 * current experiments (within the retention, bounded as the outcomes are), so
 * a restart loses nothing; from then on they are fed as turns end and as the
 * feedback topic stores a rating ({@linkcode ExperimentMonitor.feedbackStored}),
 * so the panels' refresh reads nothing from the store but the experiment's
 * control (one key) and costs nothing that grows with the stored history.
 * They are also kept as running sums ({@linkcode ExperimentTally}, with a
 * histogram for the percentiles), added to as they come and taken from as
 * they leave (the bound, the retention): the panels and the guardrail run on
 * the gateway's thread, so their refresh is a pass over the sessions' sums,
 * not over every record held. On
 * a shared store (`--kv-url`) they are this instance's turns and feedback
 * from then on plus what the store held at start, while the report reads
 * every instance's.
 *
 * The guardrail (`--guardrail`, off by default) checks every
 * `--guardrail-interval` whether a variant is worse than the baseline beyond
 * its margins with enough sessions to tell (see `guardrailBreaches`), and
 * stops it through the experiment's own control (new turns of its sessions go
 * to the baseline), then tells the operator.
 *
 * @module
 */

import { readExperimentControl } from "../gateway/experiments.ts";
import { logger } from "../log.ts";
import type { ExperimentControl } from "../projects/experiment.ts";
import {
  type ExperimentFigures,
  ExperimentTally,
  type GuardrailBreach,
  type GuardrailMargins,
  type OutcomeRecord,
  type SessionFeedback,
} from "./experiment_stats.ts";
import { OutcomeLog, readFeedback, readOutcomes } from "./outcome_log.ts";
import { Counter, Histogram, type Metric, renderMetrics, SECONDS_BUCKETS } from "./prometheus.ts";

const log = logger("experiments");

/** A project's experiment as the monitor needs it. */
export interface MonitoredExperiment {
  /** Its salt: outcomes are stored under it, so a new salt starts a new experiment. */
  readonly salt: string;
  /** Variant names in their listed order; the first is the baseline. */
  readonly variants: readonly string[];
}

/** How a turn of a session in an experiment ended: its outcome record, but for whose and when. */
export type TurnOutcome = Omit<OutcomeRecord, "variant" | "sessionId" | "requestId" | "at">;

/** The guardrail's settings. */
export interface GuardrailSettings extends GuardrailMargins {
  /** Milliseconds between checks. */
  readonly intervalMs: number;
}

/** One project's panel: its variants side by side, the verdicts, what was stopped. */
export interface ExperimentPanel {
  readonly project: string;
  readonly experiment: string;
  readonly figures: ExperimentFigures;
  /** Stopped variants, each with why (the operator's or the guardrail's reason). */
  readonly stopped: Readonly<Record<string, string>>;
  readonly winner: string | null;
}

/** Options of {@linkcode ExperimentMonitor}. */
export interface ExperimentMonitorOptions {
  /** The store outcomes are written to and feedback and control are read from. */
  readonly kv: Deno.Kv;
  /** Whether {@linkcode ExperimentMonitor.close} closes `kv`. @default {false} */
  readonly ownsStore?: boolean;
  /** Per project with variants, its experiment. */
  readonly experiments: ReadonlyMap<string, MonitoredExperiment>;
  /** Milliseconds an outcome is kept. @default {2_592_000_000} (30 days) */
  readonly retentionMs?: number;
  /** The guardrail, when on. @default {undefined} */
  readonly guardrail?: GuardrailSettings;
  /**
   * Stops a variant of a project's experiment (the experiment's control).
   * @default {undefined} (the guardrail only reports)
   */
  readonly stopVariant?: (project: string, variant: string, reason: string) => Promise<void>;
  /**
   * Outcomes, and feedback records, kept in memory per project, the oldest dropped beyond.
   * @default {100_000}
   */
  readonly maxRecords?: number;
  /** Milliseconds the panels' figures are reused for. @default {2000} */
  readonly panelCacheMs?: number;
  /** The wall clock, in Unix milliseconds. @default {Date.now} */
  readonly now?: () => number;
}

/** Per-variant figures of the running experiments. */
export class ExperimentMonitor {
  readonly #options: ExperimentMonitorOptions;
  readonly #now: () => number;
  readonly #log: OutcomeLog;
  readonly #records = new Map<string, OutcomeRecord[]>();
  readonly #feedback = new Map<string, SessionFeedback[]>();
  /** Per project, its outcomes and feedback held above, as running sums. */
  readonly #tallies = new Map<string, ExperimentTally>();
  readonly #timer: ReturnType<typeof setInterval> | undefined;
  #checking: Promise<unknown> | undefined;
  #panels: { at: number; panels: Promise<ExperimentPanel[]> } | undefined;
  #latest: ExperimentPanel[] | undefined;

  readonly #requests = new Counter(
    "vllm_mqtt_variant_requests_total",
    "Turns of a project with an experiment, by project, variant and outcome (answered, or the error code)",
  );
  readonly #ttfd = new Histogram(
    "vllm_mqtt_variant_time_to_first_delta_seconds",
    "Time from arrival to the first delta, by project and variant",
    SECONDS_BUCKETS,
    true,
  );
  readonly #total = new Histogram(
    "vllm_mqtt_variant_request_duration_seconds",
    "Time from arrival to the final answer, by project and variant",
    SECONDS_BUCKETS,
    true,
  );
  readonly #tokensIn = new Counter(
    "vllm_mqtt_variant_prompt_tokens_total",
    "Prompt tokens of an experiment's turns, by project and variant",
  );
  readonly #tokensOut = new Counter(
    "vllm_mqtt_variant_generation_tokens_total",
    "Generated tokens of an experiment's turns, by project and variant",
  );
  readonly #parseFailures = new Counter(
    "vllm_mqtt_variant_parse_failures_total",
    "Hint or JSON answers that did not parse as the object the project asks for, by project and variant",
  );
  #metrics: readonly Metric[] = [
    this.#requests,
    this.#ttfd,
    this.#total,
    this.#tokensIn,
    this.#tokensOut,
    this.#parseFailures,
  ];

  private constructor(options: ExperimentMonitorOptions) {
    this.#options = options;
    this.#now = options.now ?? Date.now;
    this.#log = new OutcomeLog(options.kv, { retentionMs: options.retentionMs });
    this.#metrics = [...this.#metrics, this.#log.notStored];
    for (const [project, experiment] of options.experiments) {
      this.#records.set(project, []);
      this.#feedback.set(project, []);
      this.#tallies.set(project, new ExperimentTally({ bucketed: true }));
      // A sample per variant from the start, so that a variant with no errors yet has a series.
      for (const variant of experiment.variants) {
        this.#requests.inc({ project, variant, outcome: "answered" }, 0);
        this.#parseFailures.inc({ project, variant }, 0);
      }
    }
    const guardrail = options.guardrail;
    this.#timer = guardrail && options.experiments.size > 0
      ? setInterval(() => {
        this.#checking ??= this.checkGuardrail()
          .catch((error) =>
            log.error("Guardrail check failed: {message}", { message: String(error) })
          )
          .finally(() => this.#checking = undefined);
      }, guardrail.intervalMs)
      : undefined;
  }

  /** Starts monitoring: notes each experiment's variants and loads what the store kept of it. */
  static async open(options: ExperimentMonitorOptions): Promise<ExperimentMonitor> {
    const monitor = new ExperimentMonitor(options);
    const since = monitor.#now() - (options.retentionMs ?? 30 * 24 * 3_600_000);
    const max = options.maxRecords ?? 100_000;
    for (const [project, experiment] of options.experiments) {
      await monitor.#log.describe(project, experiment.salt, experiment.variants);
      const stored = (await readOutcomes(options.kv, project, { since })).get(experiment.salt);
      const records = monitor.#records.get(project)!;
      if (stored) keep(records, stored.sort((a, b) => a.at - b.at), max);
      const feedback = monitor.#feedback.get(project)!;
      keep(
        feedback,
        (await readFeedback(options.kv, project, { since })).sort((a, b) => a.at - b.at),
        max,
      );
      const tally = monitor.#tallies.get(project)!;
      for (const record of records) tally.addOutcome(record);
      for (const rating of feedback) tally.addFeedback(rating);
    }
    return monitor;
  }

  /** Counts and stores how a turn of a session of `project` on `variant` ended. */
  turnEnded(
    project: string,
    sessionId: string,
    requestId: string | undefined,
    variant: string,
    outcome: TurnOutcome,
  ): void {
    const experiment = this.#options.experiments.get(project);
    if (!experiment) return;
    const labels = { project, variant };
    this.#requests.inc({
      ...labels,
      outcome: outcome.ok ? "answered" : outcome.errorCode ?? "internal",
    });
    if (outcome.ok) {
      if (outcome.ttfdMs !== undefined) this.#ttfd.observe(outcome.ttfdMs / 1000, labels);
      this.#total.observe(outcome.totalMs / 1000, labels);
    }
    this.#tokensIn.inc(labels, outcome.tokensIn);
    this.#tokensOut.inc(labels, outcome.tokensOut);
    if (outcome.parseFailed) this.#parseFailures.inc(labels);
    const record: OutcomeRecord = {
      variant,
      sessionId,
      ...(requestId !== undefined && { requestId }),
      ok: outcome.ok,
      ...(outcome.errorCode !== undefined && { errorCode: outcome.errorCode }),
      ...(outcome.ttfdMs !== undefined && { ttfdMs: Math.round(outcome.ttfdMs) }),
      totalMs: Math.round(outcome.totalMs),
      tokensIn: outcome.tokensIn,
      tokensOut: outcome.tokensOut,
      ...(outcome.parseFailed && { parseFailed: true }),
      at: this.#now(),
    };
    const tally = this.#tallies.get(project)!;
    tally.addOutcome(record);
    for (const dropped of this.#keep(this.#records, project, record)) tally.removeOutcome(dropped);
    this.#log.add(project, experiment.salt, record);
  }

  /**
   * Notes a rating or label the feedback topic just stored (once per request), for the panels:
   * they read feedback from here, not from the store.
   */
  feedbackStored(project: string, feedback: SessionFeedback): void {
    const tally = this.#tallies.get(project);
    if (!tally) return;
    tally.addFeedback(feedback);
    for (const dropped of this.#keep(this.#feedback, project, feedback)) {
      tally.removeFeedback(dropped);
    }
  }

  /**
   * The variant that answered request `requestId` of a session, when its outcome is among those
   * kept here (this instance's turns, and what the store held at the start); the latest first,
   * as a rating mostly follows its answer soon.
   */
  answeredBy(project: string, sessionId: string, requestId: string): string | undefined {
    const records = this.#records.get(project) ?? [];
    for (let i = records.length - 1; i >= 0; i--) {
      const record = records[i];
      if (record.ok && record.sessionId === sessionId && record.requestId === requestId) {
        return record.variant;
      }
    }
    return undefined;
  }

  /** The per-variant metrics, in Prometheus text format (empty without experiments). */
  prometheus(): string {
    return this.#options.experiments.size === 0 ? "" : renderMetrics(this.#metrics);
  }

  /** Each experiment's figures, verdicts and stopped variants (reused for a moment). */
  panels(): Promise<ExperimentPanel[]> {
    const now = this.#now();
    if (!this.#panels || now - this.#panels.at >= (this.#options.panelCacheMs ?? 2000)) {
      this.#panels = { at: now, panels: this.#computePanels() };
      this.#panels.panels.catch(() => this.#panels = undefined);
    }
    return this.#panels.panels;
  }

  /**
   * The panels as last computed, for a caller that cannot wait (the live
   * page's updates); starts computing them again when they are stale.
   */
  snapshot(): ExperimentPanel[] | undefined {
    const pending = this.panels();
    pending.then((panels) => this.#latest = panels, () => {});
    return this.#latest;
  }

  /**
   * Stops each variant found worse than its baseline beyond the margins (not
   * one stopped already); returns what it found.
   */
  async checkGuardrail(): Promise<GuardrailBreach[]> {
    const guardrail = this.#options.guardrail;
    if (!guardrail) return [];
    const found: GuardrailBreach[] = [];
    for (const [project, experiment] of this.#options.experiments) {
      const control = await this.#control(project, experiment);
      if (control?.winner !== undefined) continue;
      const stopped = new Set(control?.stopped ?? []);
      const breaches = this.#current(project)
        .breaches(experiment.variants, guardrail)
        .filter((breach) => !stopped.has(breach.variant));
      for (const breach of breaches) {
        const reason = `guardrail: ${breach.reason}`;
        log.warn("Experiment {experiment} of {project}: variant {variant} stopped, {reason}", {
          experiment: experiment.salt,
          project,
          variant: breach.variant,
          reason,
        });
        await this.#options.stopVariant?.(project, breach.variant, reason);
        this.#panels = undefined;
        found.push(breach);
      }
    }
    return found;
  }

  /** Stops the guardrail and writes what is queued. */
  async close(): Promise<void> {
    clearInterval(this.#timer);
    await this.#checking;
    await this.#log.flushed();
    if (this.#options.ownsStore) this.#options.kv.close();
  }

  /** Resolves once every outcome so far is stored. */
  flushed(): Promise<void> {
    return this.#log.flushed();
  }

  async #computePanels(): Promise<ExperimentPanel[]> {
    const panels: ExperimentPanel[] = [];
    for (const [project, experiment] of this.#options.experiments) {
      const tally = this.#current(project);
      const control = await this.#control(project, experiment);
      const stopped: Record<string, string> = {};
      for (const variant of control?.stopped ?? []) {
        stopped[variant] = control?.reasons[variant] ?? "stopped";
      }
      panels.push({
        project,
        experiment: experiment.salt,
        figures: tally.figures({ variants: experiment.variants }),
        stopped,
        winner: control?.winner ?? null,
      });
    }
    return panels;
  }

  #control(
    project: string,
    experiment: MonitoredExperiment,
  ): Promise<ExperimentControl | undefined> {
    return readExperimentControl(this.#options.kv, project, experiment.salt);
  }

  /**
   * The running sums of `project`, once its outcomes and feedback older than
   * the retention are taken out (the oldest first: a look at the first held
   * when none is due).
   */
  #current(project: string): ExperimentTally {
    const tally = this.#tallies.get(project)!;
    const since = this.#now() - (this.#options.retentionMs ?? 30 * 24 * 3_600_000);
    for (const record of expired(this.#records.get(project)!, since)) tally.removeOutcome(record);
    for (const rating of expired(this.#feedback.get(project)!, since)) tally.removeFeedback(rating);
    return tally;
  }

  /** Appends `record` to the list of `project` in `lists`; returns the oldest dropped for it. */
  #keep<T>(lists: Map<string, T[]>, project: string, record: T): T[] {
    const list = lists.get(project);
    return list ? keep(list, [record], this.#options.maxRecords ?? 100_000) : [];
  }
}

/** Appends `records` to `list`, the oldest dropped beyond `max`; returns those dropped. */
function keep<T>(list: T[], records: readonly T[], max: number): T[] {
  for (const record of records) list.push(record);
  // Dropped a tenth at a time: one at a time would shift the whole list on every turn.
  return list.length > max ? list.splice(0, list.length - Math.floor(max * 0.9)) : [];
}

/** Takes the records before `since` out of `list` (kept in time order) and returns them. */
function expired<T extends { readonly at: number }>(list: T[], since: number): T[] {
  const first = list.findIndex((r) => r.at >= since);
  return list.splice(0, first < 0 ? list.length : first);
}
