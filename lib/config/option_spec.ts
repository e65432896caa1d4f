/**
 * What one command-line option is, and the constructors the option table is
 * written with. Each constructor fixes the option's kind, builds the reader
 * of its text (the flag's, the environment's, the default's) and carries the
 * type of the value it yields, so that the configuration's type is derived
 * from the table itself: adding an option is one entry there.
 *
 * @module
 */

import { badValue } from "./config_error.ts";
import {
  formatDuration,
  formatSize,
  parseBoolean,
  parseDuration,
  parseNumber,
  parseSize,
} from "./values.ts";

/** The kinds of value an option holds. */
export type OptionKind =
  | "string"
  | "int"
  | "number"
  | "boolean"
  | "list"
  /** Held in milliseconds; written `250ms`, `30s`, `5m`, `2h`, or bare in the option's `unit`. */
  | "duration"
  /** Held in bytes; written `512B`, `64KiB`, `6MiB`, `1GiB`, or bare in bytes. */
  | "size";

/** One option: its name on the command line, its kind, default, help text and reader. */
export interface OptionSpec<F extends string = string, T = unknown> {
  /** The flag without its dashes, in kebab case (`max-model-len`). */
  readonly name: string;
  /** The field of the parsed values it fills (`maxModelLen`). */
  readonly field: F;
  readonly kind: OptionKind;
  /**
   * The value when neither the flag nor its environment variable is given, as
   * a user would write it (`2m`, `6MiB`); it goes through the same reader.
   * None: the value is undefined.
   */
  readonly default?: string | number | boolean | readonly string[];
  /** Smallest accepted value, for numbers, durations (ms) and sizes (bytes). */
  readonly min?: number;
  /** Largest accepted value, for numbers, durations (ms) and sizes (bytes). */
  readonly max?: number;
  /** The accepted values, for `string` and `int`. */
  readonly choices?: readonly string[];
  /** For durations: the unit of a bare number (the option's unit before suffixes existed). */
  readonly unit?: "ms" | "s";
  /** Other names the flag answers to (the original Python script's names, former names). */
  readonly aliases?: readonly string[];
  /** A secret: never logged, and a warning when given on the command line. */
  readonly secret?: boolean;
  readonly help: string;
  /** The section of `--help` it is listed under. */
  readonly group: string;
  /** Reads one text form of the value. @throws {ConfigError} naming the option and the text. */
  readonly parse: (raw: string) => T;
}

/** A default as its option's reader takes it (a list's items joined by commas); none: undefined. */
export function defaultText(option: OptionSpec): string | undefined {
  const value = option.default;
  if (value === undefined) return undefined;
  return Array.isArray(value) ? value.join(",") : String(value);
}

/** What every constructor takes. */
interface Common<F extends string> {
  readonly name: string;
  readonly field: F;
  readonly group: string;
  readonly help: string;
  readonly aliases?: readonly string[];
  readonly secret?: boolean;
}

/** A bound as the option's own unit writes it (`1s`, `1KiB`, `0.05`). */
export function formatBound(option: OptionSpec, value: number): string {
  if (option.kind === "duration") return formatDuration(value);
  if (option.kind === "size") return formatSize(value);
  return String(value);
}

/** The `min`/`max` check every numeric kind shares. */
function inRange(option: OptionSpec, value: number, raw: string): number {
  if (option.min !== undefined && value < option.min) {
    throw badValue(option.name, `at least ${formatBound(option, option.min)}`, raw);
  }
  if (option.max !== undefined && value > option.max) {
    throw badValue(option.name, `at most ${formatBound(option, option.max)}`, raw);
  }
  return value;
}

/** Text; without a default, undefined when not given. */
export function text<const F extends string, const D extends string | undefined = undefined>(
  spec: Common<F> & { readonly default?: D },
): OptionSpec<F, D extends string ? string : string | undefined> {
  return { ...spec, kind: "string", parse: (raw) => raw };
}

/** One of a fixed set of words. */
export function choice<const F extends string, const C extends string>(
  spec: Common<F> & { readonly choices: readonly C[]; readonly default: NoInfer<C> },
): OptionSpec<F, C> {
  const option: OptionSpec<F, C> = {
    ...spec,
    kind: "string",
    parse: (raw) => {
      if (!spec.choices.includes(raw as C)) {
        throw badValue(spec.name, `one of ${spec.choices.join(", ")}`, raw);
      }
      return raw as C;
    },
  };
  return option;
}

/** On or off: `--flag`, `--no-flag`, `--flag=false`, `--flag False`. */
export function flag<const F extends string>(
  spec: Common<F> & { readonly default: boolean },
): OptionSpec<F, boolean> {
  return {
    ...spec,
    kind: "boolean",
    parse: (raw) => parseBoolean(raw) ?? throwBad(spec.name, "true or false", raw),
  };
}

/** Words separated by commas or spaces. */
export function list<const F extends string>(
  spec: Common<F> & { readonly default: readonly string[] },
): OptionSpec<F, readonly string[]> {
  return { ...spec, kind: "list", parse: (raw) => raw.split(/[\s,]+/).filter((item) => item) };
}

interface Bounds {
  readonly min?: number;
  readonly max?: number;
}

/** A number, whole with `int`; `choices` restricts it to a few values. */
function numeric<const F extends string>(
  kind: "int" | "number",
  spec: Common<F> & Bounds & { readonly default: number; readonly choices?: readonly number[] },
): OptionSpec<F, number> {
  const option: OptionSpec<F, number> = {
    ...spec,
    kind,
    choices: spec.choices?.map(String),
    parse: (raw) => {
      if (option.choices && !option.choices.includes(raw)) {
        throw badValue(spec.name, `one of ${option.choices.join(", ")}`, raw);
      }
      const value = parseNumber(raw) ?? throwBad(spec.name, "a number", raw);
      if (kind === "int" && !Number.isInteger(value)) throwBad(spec.name, "an integer", raw);
      return inRange(option, value, raw);
    },
  };
  return option;
}

/** A whole number. */
export function int<const F extends string>(
  spec: Common<F> & Bounds & { readonly default: number; readonly choices?: readonly number[] },
): OptionSpec<F, number> {
  return numeric("int", spec);
}

/** A number, fractions allowed. */
export function num<const F extends string>(
  spec: Common<F> & Bounds & { readonly default: number },
): OptionSpec<F, number> {
  return numeric("number", spec);
}

/** Bounds as written in the table (`1s`), in the value's unit. */
interface TextBounds {
  readonly min?: string;
  readonly max?: string;
}

/** Reads a bound written in the table; one that cannot be read is a mistake in the table. */
function bound(
  name: string,
  text: string | undefined,
  read: (text: string) => number | undefined,
): number | undefined {
  if (text === undefined) return undefined;
  const value = read(text);
  if (value === undefined) throw new Error(`option table: --${name}'s bound ${text} is unreadable`);
  return value;
}

/** A duration, held in milliseconds; a bare number is in `unit`. */
export function duration<const F extends string>(
  spec: Common<F> & TextBounds & { readonly default: string; readonly unit: "ms" | "s" },
): OptionSpec<F, number> {
  const read = (text: string) => parseDuration(text, spec.unit);
  const option: OptionSpec<F, number> = {
    ...spec,
    kind: "duration",
    min: bound(spec.name, spec.min, read),
    max: bound(spec.name, spec.max, read),
    parse: (raw) =>
      inRange(
        option,
        read(raw) ?? throwBad(spec.name, `a duration such as 250ms, 30s, 5m or 2h`, raw),
        raw,
      ),
  };
  return option;
}

/** A size, held in bytes; a bare number is in bytes. */
export function size<const F extends string>(
  spec: Common<F> & TextBounds & { readonly default: string },
): OptionSpec<F, number> {
  const option: OptionSpec<F, number> = {
    ...spec,
    kind: "size",
    min: bound(spec.name, spec.min, parseSize),
    max: bound(spec.name, spec.max, parseSize),
    parse: (raw) => {
      const value = parseSize(raw) ??
        throwBad(spec.name, "a size such as 4096, 64KiB or 6MiB", raw);
      if (!Number.isInteger(value)) throwBad(spec.name, "a whole number of bytes", raw);
      return inRange(option, value, raw);
    },
  };
  return option;
}

/** The option with its value passed through `to` (a field of another type than the text's). */
export function transform<const F extends string, T, U>(
  option: OptionSpec<F, T>,
  to: (value: T) => U,
): OptionSpec<F, U> {
  return { ...option, parse: (raw) => to(option.parse(raw)) };
}

function throwBad(option: string, what: string, raw: string): never {
  throw badValue(option, what, raw);
}
