/**
 * Helpers of the project file's parsing. Private to `lib/projects/`.
 *
 * @module
 */

/** Stops the parsing with a `ConfigError` naming the file, `key` and the problem. */
export type Fail = (key: string, problem: string) => never;

/** A name the engine takes for a tool or a response format: letters, digits, `_` and `-`. */
export const TOOL_NAME = /^[A-Za-z0-9_-]{1,64}$/;

/** Whether `value` is a JSON object (not null, not an array). */
export function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** A value as an error message quotes it: JSON, cut after 60 characters. */
export function show(value: unknown): string {
  const text = JSON.stringify(value) ?? String(value);
  return text.length > 60 ? `${text.slice(0, 60)}…` : text;
}

/** `value`, and everything in it, frozen. */
export function deepFreeze<T>(value: T): T {
  if (typeof value === "object" && value !== null) {
    for (const inner of Object.values(value)) deepFreeze(inner);
    Object.freeze(value);
  }
  return value;
}
