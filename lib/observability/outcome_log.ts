/**
 * The stored record of an experiment: one outcome per turn of a project with
 * variants, kept in the service's Deno KV (so the report survives restarts
 * and sees every instance on a shared store) for `--outcome-retention`, and
 * read back with the feedback the feedback topic stored.
 *
 * Key layout:
 *
 * - `["outcome", project, experiment, at, turnId]` → {@linkcode OutcomeRecord}
 *   (written here, expiring after the retention);
 * - `["experiment_meta", project, experiment]` → {@linkcode ExperimentMeta}
 *   (its variants in their listed order: the report's baseline is the first);
 * - `["feedback", project, sessionId, requestId]` → `{ variant?, score?, label?, at }`
 *   (written once per request by the feedback topic; only read here).
 *
 * Outcomes are written off the reply path: {@linkcode OutcomeLog.add} only
 * queues, and the queue goes to the store in atomic batches, one batch at a
 * time (what ends while one is written goes in the next), as turns are
 * grouped in `group_commit.ts`. An outcome the store refuses (a full disk) is
 * logged and dropped: figures are not worth failing a turn for. While the
 * store stalls the queue grows, up to `maxPending` outcomes (10,000, a few
 * megabytes); beyond, a new outcome is dropped (the queued ones keep their
 * place) and counted. Both losses are counted on `/metrics`, in
 * `vllm_mqtt_variant_outcomes_dropped_total{reason}` (`queue_full`,
 * `store_error`); the live page's figures, kept in memory, still have them.
 *
 * @module
 */

import { logger, LogThrottle } from "../log.ts";
import type { OutcomeRecord, SessionFeedback } from "./experiment_stats.ts";
import { Counter } from "./prometheus.ts";

const log = logger("experiments");

/** An experiment's variants as its project file listed them when it ran. */
export interface ExperimentMeta {
  readonly variants: readonly string[];
  /** When it was last written, in Unix milliseconds. */
  readonly at: number;
}

/** Deno KV takes up to 1000 mutations an atomic operation; outcomes are a few hundred bytes. */
const BATCH = 500;

/** Options of {@linkcode OutcomeLog}. */
export interface OutcomeLogOptions {
  /** Milliseconds an outcome is kept. @default {2_592_000_000} (30 days) */
  readonly retentionMs?: number;
  /** Outcomes queued at most while the store is slow; more are dropped. @default {10_000} */
  readonly maxPending?: number;
}

/** Writes outcome records to the store, batched, off the reply path. */
export class OutcomeLog {
  readonly #kv: Deno.Kv;
  readonly #retentionMs: number;
  readonly #maxPending: number;
  #pending: { key: Deno.KvKey; value: OutcomeRecord }[] = [];
  #writing: Promise<void> | undefined;
  #lost = 0;
  #dropped = 0;
  /** A stalled store drops outcomes on every turn: logged once a minute. */
  readonly #throttle = new LogThrottle();
  /** Outcomes not stored, by why: `/metrics` (the experiment monitor renders it). */
  readonly notStored = new Counter(
    "vllm_mqtt_variant_outcomes_dropped_total",
    "Experiment outcomes not stored (so not in the report): the write queue was full while the store stalled (queue_full), or the store refused them (store_error)",
  );

  constructor(kv: Deno.Kv, options: OutcomeLogOptions = {}) {
    this.#kv = kv;
    this.#retentionMs = options.retentionMs ?? 30 * 24 * 3_600_000;
    this.#maxPending = options.maxPending ?? 10_000;
    this.notStored.inc({ reason: "queue_full" }, 0);
    this.notStored.inc({ reason: "store_error" }, 0);
  }

  /** Outcomes the store refused (dropped, logged). */
  get lost(): number {
    return this.#lost;
  }

  /** Outcomes dropped because `maxPending` were queued already. */
  get dropped(): number {
    return this.#dropped;
  }

  /** Outcomes queued, not yet written. */
  get pending(): number {
    return this.#pending.length;
  }

  /** Queues `record` of a turn of `project` in `experiment`; written soon, never awaited. */
  add(project: string, experiment: string, record: OutcomeRecord): void {
    if (this.#pending.length >= this.#maxPending) {
      this.#dropped++;
      this.notStored.inc({ reason: "queue_full" });
      if (this.#throttle.take("queue_full") !== undefined) {
        log.warn("Experiment outcomes dropped: {n} wait for the store already ({dropped} so far)", {
          n: this.#pending.length,
          dropped: this.#dropped,
        });
      }
      return;
    }
    this.#pending.push({
      key: ["outcome", project, experiment, record.at, crypto.randomUUID()],
      value: record,
    });
    this.#writing ??= this.#write();
  }

  /** Notes (once per run of the service) an experiment's variants, in their listed order. */
  async describe(project: string, experiment: string, variants: readonly string[]): Promise<void> {
    const meta: ExperimentMeta = { variants, at: Date.now() };
    await this.#kv.set(["experiment_meta", project, experiment], meta);
  }

  /** Resolves once everything queued so far is written (or dropped). */
  async flushed(): Promise<void> {
    while (this.#writing) await this.#writing;
  }

  async #write(): Promise<void> {
    // After the turn's own work of this tick (its reply is published before this runs).
    await Promise.resolve();
    try {
      while (this.#pending.length > 0) {
        const batch = this.#pending.splice(0, BATCH);
        const op = this.#kv.atomic();
        for (const { key, value } of batch) op.set(key, value, { expireIn: this.#retentionMs });
        try {
          await op.commit();
        } catch (error) {
          this.#lost += batch.length;
          this.notStored.inc({ reason: "store_error" }, batch.length);
          log.warn("{n} experiment outcomes not stored: {message}", {
            n: batch.length,
            message: String(error),
          });
        }
      }
    } finally {
      this.#writing = undefined;
    }
  }
}

/** A time range in Unix milliseconds, both ends optional: `since` included, `until` not. */
export interface TimeRange {
  readonly since?: number;
  readonly until?: number;
}

/** Every stored outcome of `project` in `range`, by experiment. */
export async function readOutcomes(
  kv: Deno.Kv,
  project: string,
  range: TimeRange = {},
): Promise<Map<string, OutcomeRecord[]>> {
  const found = new Map<string, OutcomeRecord[]>();
  for await (const entry of kv.list<OutcomeRecord>({ prefix: ["outcome", project] })) {
    const [, , experiment, at] = entry.key as [string, string, string, number];
    if (!inRange(at, range)) continue;
    let list = found.get(experiment);
    if (!list) found.set(experiment, list = []);
    list.push(entry.value);
  }
  return found;
}

/** Every stored feedback record of `project` in `range`. */
export async function readFeedback(
  kv: Deno.Kv,
  project: string,
  range: TimeRange = {},
): Promise<SessionFeedback[]> {
  const found: SessionFeedback[] = [];
  for await (
    const entry of kv.list<Omit<SessionFeedback, "sessionId" | "requestId">>({
      prefix: ["feedback", project],
    })
  ) {
    const [, , sessionId, requestId] = entry.key as [string, string, string, string];
    const value = entry.value;
    if (typeof value !== "object" || value === null || !inRange(value.at, range)) continue;
    found.push({ ...value, sessionId, requestId });
  }
  return found;
}

/** The variants of `experiment` of `project` as last described, if it was. */
export async function readExperimentMeta(
  kv: Deno.Kv,
  project: string,
  experiment: string,
): Promise<ExperimentMeta | undefined> {
  return (await kv.get<ExperimentMeta>(["experiment_meta", project, experiment])).value ??
    undefined;
}

function inRange(at: number, range: TimeRange): boolean {
  return typeof at === "number" && (range.since === undefined || at >= range.since) &&
    (range.until === undefined || at < range.until);
}
