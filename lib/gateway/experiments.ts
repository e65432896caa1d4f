/**
 * The experiments of the served projects at run time: each session's variant,
 * stored once with the session, and the operator's decisions (a winner, a
 * variant stopped), shared by every instance through Deno KV.
 *
 * Keys:
 *
 * - `["variant", project, sessionId]` → {@linkcode VariantRecord}: the
 *   variant a session was first given, written with an atomic check (only
 *   where none is) so that two instances agree: the first write wins, the
 *   other reads it. It outlives the session (`--session-ttl` from its last
 *   turn): it is kept twice that, written again at least every half of it.
 * - `["experiment_control", project, experiment]` → {@linkcode ExperimentControl}:
 *   read again by every instance every `controlReloadMs`; keyed by the
 *   experiment's salt, so a new experiment starts without the last one's
 *   winner or stopped variants.
 * - `["feedback", project, sessionId, requestId]` → {@linkcode FeedbackRecord}
 *   (`feedback_topic.ts`): written once (atomic check), kept 90 days.
 *
 * The variant that answers a turn is the stored one, unless the operator
 * named a winner or stopped it ({@linkcode servedVariant}); a weight change
 * moves no running session (it has its stored variant), and a restart or
 * another instance reads the same record. Assignments are cached (an LRU), so
 * a session's later turns on this instance read nothing from the store.
 *
 * @module
 */

import { LruMap } from "../_util.ts";
import { logger } from "../log.ts";
import {
  assignVariant,
  type Experiment,
  type ExperimentControl,
  servedVariant,
  type Variant,
} from "../projects/experiment.ts";
import type { Project } from "../projects/project_file.ts";
import { ServiceError } from "../protocol/errors.ts";
import { commitWhenFree, openKv } from "../sessions/_util.ts";

export type { ExperimentControl } from "../projects/experiment.ts";

/** A session's variant as stored. */
export interface VariantRecord {
  readonly variant: string;
  /** The experiment's salt when it was given. */
  readonly experiment: string;
  /** When it was given, in milliseconds since the epoch. */
  readonly at: number;
}

/** One stored feedback record (`feedback_topic.ts`). */
export interface FeedbackRecord {
  /** The variant answering the session when the feedback came. */
  readonly variant?: string;
  readonly score?: number;
  readonly label?: string;
  /** When it was stored, in milliseconds since the epoch. */
  readonly at: number;
}

/** Options of {@linkcode Experiments}. */
export interface ExperimentsOptions {
  /** The served projects; those with an experiment are the ones served here. */
  readonly projects: ReadonlyMap<string, Project>;
  /** Milliseconds a session lives after its last turn (`--session-ttl`). */
  readonly ttlMs: number;
  /**
   * Milliseconds between reads of the operator's decisions.
   * @default {1000}
   */
  readonly controlReloadMs?: number;
  /**
   * Sessions whose variant is kept in memory.
   * @default {100000}
   */
  readonly cacheSize?: number;
  /**
   * The wall clock, in milliseconds since the epoch.
   * @default {Date.now}
   */
  readonly now?: () => number;
  /**
   * Told when the operator's decisions on a project's experiment change: read
   * from the store (at the start, or set by another instance) or decided here.
   * @default {undefined}
   */
  readonly onControl?: (project: string) => void;
}

/** What a session's stored variant is kept in memory with. */
interface Cached {
  readonly record: VariantRecord;
  /** When this instance last wrote or read it (its time to live is counted from a write). */
  refreshedAt: number;
  versionstamp: string;
}

const log = logger("gateway");

/** The key of a session's variant. */
function variantKey(project: string, sessionId: string): Deno.KvKey {
  return ["variant", project, sessionId];
}

/** The key of the feedback on one request of a session. */
function feedbackKey(project: string, sessionId: string, requestId: string): Deno.KvKey {
  return ["feedback", project, sessionId, requestId];
}

/** How long feedback is kept for the reports: 90 days. */
const FEEDBACK_KEEP_MS = 90 * 24 * 3_600_000;

/** The key of the operator's control of `project`'s experiment `experiment` (its salt). */
function controlKey(project: string, experiment: string): Deno.KvKey {
  return ["experiment_control", project, experiment];
}

/** The experiments of the served projects, and the sessions' variants. */
export class Experiments {
  readonly #kv: Deno.Kv;
  readonly #options: ExperimentsOptions;
  readonly #now: () => number;
  readonly #cache: LruMap<string, Cached>;
  readonly #controls = new Map<string, ExperimentControl>();
  readonly #timer: ReturnType<typeof setInterval>;
  #closed = false;

  private constructor(kv: Deno.Kv, options: ExperimentsOptions) {
    this.#kv = kv;
    this.#options = options;
    this.#now = options.now ?? Date.now;
    this.#cache = new LruMap(options.cacheSize ?? 100_000);
    this.#timer = setInterval(() => this.reload(), options.controlReloadMs ?? 1000);
  }

  /** Opens the store at `path` and reads the operator's decisions once. */
  static async open(path: string, options: ExperimentsOptions): Promise<Experiments> {
    const experiments = new Experiments(await openKv(path), options);
    await experiments.reload();
    return experiments;
  }

  /** The experiment of `project`, if it has one. */
  experiment(project: string): Experiment | undefined {
    return this.#options.projects.get(project)?.experiment;
  }

  /** The operator's decisions on `project`'s experiment, as last read. */
  control(project: string): ExperimentControl | undefined {
    return this.#controls.get(project);
  }

  /**
   * The stopped variants of each project that has some, each with why (the
   * operator's or the guardrail's reason), as last read: what the status
   * topic's `stopped_variants` says.
   */
  stoppedVariants(): Record<string, Record<string, string>> {
    const stopped: Record<string, Record<string, string>> = {};
    for (const [project, control] of this.#controls) {
      for (const variant of control.stopped) {
        (stopped[project] ??= {})[variant] = control.reasons[variant] ?? "stopped";
      }
    }
    return stopped;
  }

  /** Reads the operator's decisions again (every instance does, every second). */
  async reload(): Promise<void> {
    const projects = [...this.#options.projects.values()].filter((p) => p.experiment);
    if (projects.length === 0 || this.#closed) return;
    try {
      const entries = await this.#kv.getMany<ExperimentControl[]>(
        projects.map((p) => controlKey(p.name, p.experiment!.salt)),
      );
      for (const [i, entry] of entries.entries()) {
        const name = projects[i].name;
        const before = this.#controls.get(name);
        if (entry.value === null) this.#controls.delete(name);
        else this.#controls.set(name, entry.value);
        if (entry.value?.at === before?.at) continue;
        if (entry.value !== null) {
          log.info("Experiment of {project}: {control}", {
            project: name,
            control: JSON.stringify(entry.value),
          });
        }
        this.#options.onControl?.(name);
      }
    } catch (error) {
      if (!this.#closed) {
        log.warn("Reading the experiments' control: {message}", { message: String(error) });
      }
    }
  }

  /**
   * The variant that answers `sessionId` of `project` now, giving the session
   * one (stored, first write wins) if it has none; undefined for a project
   * without an experiment. `requested`: the variant the request asks for,
   * taken only where the project allows it and the session has none yet or
   * that one.
   *
   * @throws {ServiceError} `forbidden` for a request choosing a variant where
   * the project does not allow it; `invalid_request` for one it does not have,
   * or another than the session's.
   */
  async assign(
    project: string,
    sessionId: string,
    requested?: string,
  ): Promise<Variant | undefined> {
    const experiment = this.experiment(project);
    // Without an experiment a request's `variant` is ignored, as every unknown field is.
    if (experiment === undefined) return undefined;
    if (requested !== undefined) {
      if (!experiment.allowRequest) {
        throw new ServiceError(
          "forbidden",
          `project ${project} does not let a request choose its variant (allow_variant_request is off)`,
        );
      }
      if (!experiment.variants.some((v) => v.name === requested)) {
        throw new ServiceError(
          "invalid_request",
          `'variant': project ${project} has no variant ${JSON.stringify(requested)} (it has ${
            experiment.variants.map((v) => v.name).join(", ")
          })`,
        );
      }
    }
    const record = await this.#stored(project, sessionId, experiment, requested);
    const name = servedVariant(experiment, record.variant, sessionId, this.control(project));
    if (requested !== undefined && name !== requested) {
      throw new ServiceError(
        "invalid_request",
        `'variant': session ${sessionId} is answered by variant ${name}, not ${requested}`,
      );
    }
    return experiment.variants.find((v) => v.name === name);
  }

  /**
   * The variant that answers a session now, from memory alone (for a reply
   * that does not come from a turn: a refusal, a repeat); undefined when this
   * instance has not seen the session, or the project runs no experiment.
   */
  known(project: string, sessionId: string): string | undefined {
    const experiment = this.experiment(project);
    const cached = experiment && this.#cache.get(`${project}\0${sessionId}`);
    if (!cached) return undefined;
    return servedVariant(experiment!, cached.record.variant, sessionId, this.control(project));
  }

  /**
   * The session's stored variant: from memory, else the store, else given now.
   *
   * Each write (the first, and one at least every half `ttlMs` while the
   * session has turns here) keeps the record for twice `ttlMs`: it outlives
   * the session, which lives `ttlMs` from its last turn. A record read from
   * the store is written again at once, since when it was written is not known.
   */
  async #stored(
    project: string,
    sessionId: string,
    experiment: Experiment,
    requested: string | undefined,
  ): Promise<VariantRecord> {
    const cacheKey = `${project}\0${sessionId}`;
    const now = this.#now();
    const cached = this.#cache.get(cacheKey);
    if (
      cached && cached.record.experiment === experiment.salt &&
      now - cached.refreshedAt < this.#options.ttlMs / 2
    ) return cached.record;
    const key = variantKey(project, sessionId);
    const keep = { expireIn: 2 * this.#options.ttlMs };
    let seen: Deno.KvEntryMaybe<VariantRecord> | undefined = cached && {
      key,
      value: cached.record,
      versionstamp: cached.versionstamp,
    };
    for (;;) {
      seen ??= await this.#kv.get<VariantRecord>(key);
      // The first instance to write a session's variant wins; one that finds it there keeps it.
      // One given in an earlier experiment (another salt) does not count: a new one deals anew.
      const current = seen.value?.experiment === experiment.salt ? seen.value : null;
      const record: VariantRecord = current ?? {
        variant: requested ?? assignVariant(experiment, sessionId),
        experiment: experiment.salt,
        at: now,
      };
      const write = await commitWhenFree(
        this.#kv.atomic().check({ key, versionstamp: seen.versionstamp }).set(key, record, keep),
      );
      if (write.ok) {
        this.#cache.set(cacheKey, { record, refreshedAt: now, versionstamp: write.versionstamp });
        return record;
      }
      // Another instance wrote it meanwhile: read what it wrote.
      seen = undefined;
    }
  }

  /**
   * Stores the feedback on a session's request, once: false when the
   * request_id had feedback already (this copy is not stored).
   */
  async storeFeedback(
    project: string,
    sessionId: string,
    requestId: string,
    record: FeedbackRecord,
  ): Promise<boolean> {
    const key = feedbackKey(project, sessionId, requestId);
    const write = await commitWhenFree(
      this.#kv.atomic()
        .check({ key, versionstamp: null })
        .set(key, record, { expireIn: FEEDBACK_KEEP_MS }),
    );
    return write.ok;
  }

  /** Sets the operator's decision here and in the store; the other instances read it. */
  async decide(
    project: string,
    decision: { readonly winner: string } | { readonly stop: string; readonly reason: string },
  ): Promise<ExperimentControl> {
    const { salt } = this.experiment(project)!;
    const control = "winner" in decision
      ? await endExperiment(this.#kv, project, salt, decision.winner, this.#now)
      : await stopVariant(this.#kv, project, salt, decision.stop, decision.reason, this.#now);
    this.#controls.set(project, control);
    this.#options.onControl?.(project);
    return control;
  }

  /** Stops reading the operator's decisions and closes the store. */
  close(): void {
    this.#closed = true;
    clearInterval(this.#timer);
    this.#kv.close();
  }
}

/**
 * Stops `variant` of `project`'s experiment `experiment` (its salt) at once:
 * its sessions move to the variants left, by the same hash over their
 * weights, on every instance within a second. For the operator's endpoint and
 * for a guardrail.
 */
export async function stopVariant(
  kv: Deno.Kv,
  project: string,
  experiment: string,
  variant: string,
  reason: string,
  now: () => number = Date.now,
): Promise<ExperimentControl> {
  return await changeControl(kv, controlKey(project, experiment), (control) => ({
    ...control,
    stopped: control.stopped.includes(variant) ? control.stopped : [...control.stopped, variant],
    reasons: { ...control.reasons, [variant]: reason },
    at: now(),
  }));
}

/**
 * Ends `project`'s experiment `experiment` (its salt): every session, running
 * ones too, gets `winner`.
 */
async function endExperiment(
  kv: Deno.Kv,
  project: string,
  experiment: string,
  winner: string,
  now: () => number = Date.now,
): Promise<ExperimentControl> {
  return await changeControl(
    kv,
    controlKey(project, experiment),
    (control) => ({ ...control, winner, at: now() }),
  );
}

/**
 * Reads the control of `project`'s experiment `experiment` (its salt) as
 * stored; undefined when the operator set none.
 */
export async function readExperimentControl(
  kv: Deno.Kv,
  project: string,
  experiment: string,
): Promise<ExperimentControl | undefined> {
  return (await kv.get<ExperimentControl>(controlKey(project, experiment))).value ?? undefined;
}

/** Applies `change` to the control stored at `key`, retried until no other writer came between. */
async function changeControl(
  kv: Deno.Kv,
  key: Deno.KvKey,
  change: (control: ExperimentControl) => ExperimentControl,
): Promise<ExperimentControl> {
  for (;;) {
    const entry = await kv.get<ExperimentControl>(key);
    const next = change(entry.value ?? { stopped: [], reasons: {}, at: 0 });
    const write = await commitWhenFree(kv.atomic().check(entry).set(key, next));
    if (write.ok) return next;
  }
}
