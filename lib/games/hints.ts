/**
 * Answers a game can always parse: a model's answer (text, a JSON object, or
 * tool calls) made into one JSON object, and, for the hint topic, one that
 * always has a string `hint`.
 *
 * @module
 */

import type { ProjectTool, ToolCall } from "../projects/project_tools.ts";
import type { JsonObject } from "../projects/response_format.ts";

/**
 * The text as a JSON object, if it is one: the whole text, or the whole text
 * inside one Markdown code fence (models add them even when told not to).
 */
export function jsonObjectOf(text: string): Record<string, unknown> | undefined {
  let body = text.trim();
  const fenced = /^```[A-Za-z]*\s*\n([\s\S]*?)\n?```$/.exec(body);
  if (fenced) body = fenced[1].trim();
  if (!body.startsWith("{")) return undefined;
  try {
    const value = JSON.parse(body);
    return typeof value === "object" && value !== null && !Array.isArray(value) ? value : undefined;
  } catch {
    return undefined;
  }
}

/**
 * A hint object from an answer: the answer itself when it is a JSON object
 * (its `hint` made a string: `""` when missing or null), else
 * `{"hint": "<the text>"}`.
 */
export function hintObject(answer: string): Record<string, unknown> {
  const object = jsonObjectOf(answer);
  if (object === undefined) return { hint: answer.trim() };
  const hint = object.hint;
  return {
    ...object,
    hint: typeof hint === "string"
      ? hint
      : hint === undefined || hint === null
      ? ""
      : JSON.stringify(hint),
  };
}

/** The hint object of a failed turn: `{"hint": "", "error": {code, message}}`. */
export function errorHint(
  code: string,
  message: string,
  retryAfterMs?: number,
): Record<string, unknown> {
  return {
    hint: "",
    error: { code, message, ...(retryAfterMs !== undefined && { retry_after_ms: retryAfterMs }) },
  };
}

/**
 * The answer object of a turn whose model called tools: the text (a JSON
 * object, or else the `hint`), with each call of an offered tool mapped in
 * by its `mapsTo` (arguments it leaves out take their schema's `default`).
 * A call of a tool not offered, or with arguments that are not a JSON
 * object, is left out. Lists of cells from several calls of one key are
 * joined (two `spawn_oxygen` calls spawn both lists).
 */
export function guidanceFromToolCalls(
  tools: readonly ProjectTool[],
  calls: readonly ToolCall[],
  text: string,
): Record<string, unknown> {
  const guidance: Record<string, unknown> = jsonObjectOf(text) ?? { hint: text.trim() };
  for (const call of calls) {
    const tool = tools.find((t) => t.definition.function.name === call.name);
    if (!tool) continue;
    let args: unknown;
    try {
      args = JSON.parse(call.arguments.trim() === "" ? "{}" : call.arguments);
    } catch {
      continue;
    }
    if (typeof args !== "object" || args === null || Array.isArray(args)) continue;
    const values = { ...defaultsOf(tool.definition.function.parameters), ...args } as Record<
      string,
      unknown
    >;
    if (!tool.mapsTo) {
      guidance[call.name] = values;
      continue;
    }
    for (const [key, source] of Object.entries(tool.mapsTo)) {
      let value: unknown;
      if (typeof source === "string") {
        value = values[source];
      } else {
        const parts = source.map((name) => values[name]);
        value = parts.some((part) => part === undefined || part === null) ? undefined : parts;
      }
      if (value === undefined || value === null) continue;
      const before = guidance[key];
      guidance[key] = Array.isArray(before) && Array.isArray(value) && isCellList(before) &&
          isCellList(value)
        ? [...before, ...value]
        : value;
    }
  }
  return guidance;
}

/** The `default` of each property of a parameters schema that has one. */
function defaultsOf(parameters: JsonObject | undefined): Record<string, unknown> {
  const properties = parameters?.properties;
  if (typeof properties !== "object" || properties === null) return {};
  const defaults: Record<string, unknown> = {};
  for (const [name, schema] of Object.entries(properties)) {
    if (typeof schema === "object" && schema !== null && "default" in schema) {
      defaults[name] = (schema as { default: unknown }).default;
    }
  }
  return defaults;
}

function isCellList(value: unknown[]): boolean {
  return value.every((cell) => Array.isArray(cell));
}
