/**
 * A project's experiment (A/B test): the variants its front matter lists,
 * each with a weight and what it changes in a turn, and the one rule that
 * gives a session its variant.
 *
 * ```yaml
 * experiment: maze-lora-2026-12   # the salt of the hash; default the project's name
 * allow_variant_request: false    # whether a request may choose its variant (for testing)
 * variants:
 *   - name: a
 *     weight: 80
 *   - name: b
 *     weight: 20
 *     model: maze-lora-v2         # or prompt: (a file beside the project file), temperature:,
 *                                 # top_p:, max_tokens:, response_format:
 * ```
 *
 * A session's variant is a stable hash of the salt and its id, a point in
 * [0, 1), against the cumulative weights ({@linkcode pickVariant}): the same on
 * every instance and after every restart, so a session keeps its variant as
 * long as the weights stay; the service stores the first assignment with the
 * session (`gateway/experiments.ts`) so that a weight change does not move it
 * either.
 *
 * @module
 */

import { mixedHash32 } from "../_util.ts";
import { type Fail, isObject, show } from "./_util.ts";
import { parseResponseFormat, type ResponseFormat } from "./response_format.ts";

/** One variant of an experiment: its share of new sessions, and what it changes in a turn. */
export interface Variant {
  readonly name: string;
  /** Its share of new sessions, relative to the other variants' weights (0: none). */
  readonly weight: number;
  /** The served model or LoRA adapter its turns ask for, instead of the project's. */
  readonly model?: string;
  /** The file its system prompt is read from, relative to the project file's folder. */
  readonly promptFile?: string;
  /** Its system prompt (the text of `promptFile`), instead of the project's. */
  readonly prompt?: string;
  readonly temperature?: number;
  readonly topP?: number;
  readonly maxTokens?: number;
  readonly responseFormat?: ResponseFormat;
}

/** A project's experiment. */
export interface Experiment {
  /** The salt of the assignment hash: a new salt deals the sessions anew. */
  readonly salt: string;
  /** Whether a request may choose its own variant (`"variant": "b"`). */
  readonly allowRequest: boolean;
  /** At least one; names unique, weights summing to more than 0. */
  readonly variants: readonly Variant[];
}

/** The keys of a variant's entry. */
const VARIANT_KEYS = [
  "name",
  "weight",
  "model",
  "prompt",
  "temperature",
  "top_p",
  "max_tokens",
  "response_format",
] as const;

/** A variant's name: it is a label in /metrics and a word in replies. */
const VARIANT_NAME = /^[A-Za-z0-9_.-]{1,32}$/;

/**
 * Reads the experiment keys of a front matter (`experiment`,
 * `allow_variant_request`, `variants`); undefined when it lists no variants.
 * `fail` stops the start-up with the file, the key and the problem.
 */
export function parseExperiment(
  project: string,
  data: Record<string, unknown>,
  hintTopic: boolean,
  fail: Fail,
): Experiment | undefined {
  const list = data.variants;
  if (list === undefined) {
    for (const key of ["experiment", "allow_variant_request"]) {
      if (data[key] !== undefined) fail(key, "is set, but the project lists no 'variants'");
    }
    return undefined;
  }
  const salt = data.experiment ?? project;
  if (typeof salt !== "string" || salt === "" || salt.length > 128) {
    fail("experiment", `must be a name of 1 to 128 characters, not ${show(salt)}`);
  }
  const allowRequest = data.allow_variant_request ?? false;
  if (typeof allowRequest !== "boolean") {
    fail("allow_variant_request", `must be true or false, not ${show(allowRequest)}`);
  }
  if (!Array.isArray(list) || list.length === 0) {
    fail("variants", `must be a list of variants (name, weight, ...), not ${show(list)}`);
  }
  const variants = (list as unknown[]).map((entry, i) => parseVariant(entry, i, hintTopic, fail));
  const names = new Set<string>();
  for (const { name } of variants) {
    if (names.has(name)) fail("variants", `the name ${show(name)} is used twice`);
    names.add(name);
  }
  if (!(variants.reduce((sum, v) => sum + v.weight, 0) > 0)) {
    fail("variants", "the weights sum to 0: at least one variant needs a weight above 0");
  }
  return Object.freeze({
    salt: salt as string,
    allowRequest: allowRequest as boolean,
    variants: Object.freeze(variants),
  });
}

function parseVariant(entry: unknown, index: number, hintTopic: boolean, fail: Fail): Variant {
  const at = `variants[${index}]`;
  if (!isObject(entry)) fail(at, `must be a mapping (name:, weight:, ...), not ${show(entry)}`);
  const v = entry as Record<string, unknown>;
  for (const key of Object.keys(v)) {
    if (!(VARIANT_KEYS as readonly string[]).includes(key)) {
      fail(`${at}.${key}`, `unknown key (known: ${VARIANT_KEYS.join(", ")})`);
    }
  }
  if (typeof v.name !== "string" || !VARIANT_NAME.test(v.name)) {
    fail(`${at}.name`, `must be 1 to 32 letters, digits, '_', '-' or '.', not ${show(v.name)}`);
  }
  const name = v.name as string;
  const where = `variants[${index}] (${name})`;
  if (typeof v.weight !== "number" || !Number.isFinite(v.weight) || v.weight < 0) {
    fail(`${where}.weight`, `must be a number of at least 0, not ${show(v.weight)}`);
  }
  if (v.model !== undefined && (typeof v.model !== "string" || !/^\S{1,256}$/.test(v.model))) {
    fail(`${where}.model`, `must be a model or adapter name without spaces, not ${show(v.model)}`);
  }
  if (
    v.prompt !== undefined &&
    (typeof v.prompt !== "string" || !/^[A-Za-z0-9_.\-/]{1,200}$/.test(v.prompt) ||
      v.prompt.startsWith("/") || v.prompt.split("/").includes(".."))
  ) {
    fail(
      `${where}.prompt`,
      `must be a file beside the project file (such as maze_b.txt or variants/maze_b.md), not ${
        show(v.prompt)
      }`,
    );
  }
  const number = (key: string, low: number, high: number, whole = false) => {
    const value = v[key];
    if (value === undefined) return undefined;
    if (
      typeof value !== "number" || !(value >= low && value <= high) ||
      (whole && !Number.isSafeInteger(value))
    ) {
      fail(
        `${where}.${key}`,
        `must be a ${whole ? "whole " : ""}number from ${low} to ${high}, not ${show(value)}`,
      );
    }
    return value as number;
  };
  const temperature = number("temperature", 0, 2);
  const topP = number("top_p", 0, 1);
  const maxTokens = number("max_tokens", 1, 1_000_000, true);
  const responseFormat = v.response_format === undefined
    ? undefined
    : parseResponseFormat(name, v.response_format, hintTopic, (key, problem) =>
      fail(`${where}.${key}`, problem));
  return Object.freeze({
    name,
    weight: v.weight as number,
    ...(v.model !== undefined && { model: v.model as string }),
    ...(v.prompt !== undefined && { promptFile: v.prompt as string }),
    ...(temperature !== undefined && { temperature }),
    ...(topP !== undefined && { topP }),
    ...(maxTokens !== undefined && { maxTokens }),
    ...(responseFormat !== undefined && { responseFormat }),
  });
}

/**
 * The session's point in [0, 1): a mixed FNV-1a hash of `${salt}\0${sessionId}`
 * ({@linkcode mixedHash32}), so that ids that differ in their last character
 * land far apart.
 */
export function variantPoint(salt: string, sessionId: string): number {
  return mixedHash32(`${salt}\0${sessionId}`) / 0x1_0000_0000;
}

/**
 * The variant whose share of the cumulative weights holds `point`; variants
 * of weight 0 are never picked. Undefined when no weight is above 0.
 */
export function pickVariant(
  variants: readonly Pick<Variant, "name" | "weight">[],
  point: number,
): string | undefined {
  const total = variants.reduce((sum, v) => sum + Math.max(0, v.weight), 0);
  if (!(total > 0)) return undefined;
  let cumulative = 0;
  for (const v of variants) {
    if (!(v.weight > 0)) continue;
    cumulative += v.weight;
    if (point * total < cumulative) return v.name;
  }
  // Rounding at the top end: the last variant that has a weight.
  return variants.findLast((v) => v.weight > 0)!.name;
}

/** The variant a new session of `experiment` gets (weights as they are now). */
export function assignVariant(experiment: Experiment, sessionId: string): string {
  return pickVariant(experiment.variants, variantPoint(experiment.salt, sessionId))!;
}

/**
 * The operator's decisions on a running experiment: a winner every session
 * gets, running ones too; variants stopped at once (their sessions move to
 * the others), with the reason given.
 */
export interface ExperimentControl {
  readonly winner?: string;
  readonly stopped: readonly string[];
  readonly reasons: Readonly<Record<string, string>>;
  /** When it was last changed, in milliseconds since the epoch. */
  readonly at: number;
}

/**
 * The variant that answers a session now: the winner, once the operator named
 * one; else the session's stored variant, unless it was stopped or is no
 * longer in the file: then the same point over the weights of the variants
 * left (the first of them if none of those has a weight).
 */
export function servedVariant(
  experiment: Experiment,
  stored: string,
  sessionId: string,
  control: ExperimentControl | undefined,
): string {
  const { variants } = experiment;
  const known = (name: string | undefined) => variants.some((v) => v.name === name);
  if (control?.winner !== undefined && known(control.winner)) return control.winner;
  const stopped = control?.stopped ?? [];
  if (known(stored) && !stopped.includes(stored)) return stored;
  const left = variants.filter((v) => !stopped.includes(v.name));
  const point = variantPoint(experiment.salt, sessionId);
  return pickVariant(left, point) ?? left[0]?.name ?? stored;
}
