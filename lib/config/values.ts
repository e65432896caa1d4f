/**
 * Reading and writing the values options take: booleans, numbers, durations
 * and byte sizes. Every duration is held in milliseconds and every size in
 * bytes; the text forms carry a unit suffix (`250ms`, `30s`, `5m`, `2h`;
 * `512B`, `64KiB`, `6MiB`, `1GiB`). A bare number keeps the unit the option
 * had before suffixes existed, so command lines written for it still work.
 *
 * The readers return `undefined` for text they cannot read, and leave the
 * error message to the caller, which knows the option's name.
 *
 * @module
 */

/** `true`, `1`, `yes`, `on` / `false`, `0`, `no`, `off`, in any case (Python fire wrote `False`). */
export function parseBoolean(text: string): boolean | undefined {
  const lower = text.toLowerCase();
  if (["true", "1", "yes", "on"].includes(lower)) return true;
  if (["false", "0", "no", "off"].includes(lower)) return false;
  return undefined;
}

/** A finite number, as `Number` reads it (`1e3` included); not blank text. */
export function parseNumber(text: string): number | undefined {
  const value = Number(text);
  return text.trim() === "" || !Number.isFinite(value) ? undefined : value;
}

/** Milliseconds per duration suffix, largest first (the order {@linkcode formatDuration} tries). */
export const DURATION_UNITS: Readonly<Record<string, number>> = {
  h: 3_600_000,
  m: 60_000,
  s: 1000,
  ms: 1,
};

/** Bytes per size suffix, largest first (the order {@linkcode formatSize} tries). */
export const SIZE_UNITS: Readonly<Record<string, number>> = {
  GiB: 1024 ** 3,
  MiB: 1024 ** 2,
  KiB: 1024,
  B: 1,
};

/** A number with an optional suffix: the suffix's factor times the number, or undefined. */
function withSuffix(
  text: string,
  units: Readonly<Record<string, number>>,
  bare: number,
): number | undefined {
  const [, number, suffix] = /^(.*?)\s*([a-z]*)$/i.exec(text.trim())!;
  const key = Object.keys(units).find((unit) => unit.toLowerCase() === suffix.toLowerCase());
  const factor = suffix === "" ? bare : key === undefined ? undefined : units[key];
  const value = parseNumber(number);
  return factor === undefined || value === undefined ? undefined : value * factor;
}

/**
 * A duration in milliseconds: `250ms`, `30s`, `1.5m`, `2h`, or a bare number
 * in `bareUnit`.
 */
export function parseDuration(text: string, bareUnit: "ms" | "s"): number | undefined {
  return withSuffix(text, DURATION_UNITS, DURATION_UNITS[bareUnit]);
}

/** A size in bytes: `512B`, `64KiB`, `6MiB`, `1GiB` (any case), or a bare number of bytes. */
export function parseSize(text: string): number | undefined {
  return withSuffix(text, SIZE_UNITS, 1);
}

/** The largest unit that writes `value` as a whole number (`0` has no unit to show). */
function format(value: number, units: Readonly<Record<string, number>>): string {
  if (value === 0) return "0";
  const [unit, factor] = Object.entries(units).find(([, factor]) => value % factor === 0) ??
    Object.entries(units).at(-1)!;
  return `${value / factor}${unit}`;
}

/** Milliseconds as text a user would write: `3600000` → `1h`, `1500` → `1500ms`. */
export function formatDuration(ms: number): string {
  return format(ms, DURATION_UNITS);
}

/** Bytes as text a user would write: `6291456` → `6MiB`, `1000` → `1000B`. */
export function formatSize(bytes: number): string {
  return format(bytes, SIZE_UNITS);
}
