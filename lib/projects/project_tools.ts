/**
 * A project's `tools`: functions offered to the model, and how a call of each
 * goes into the answer object (`maps_to`).
 *
 * @module
 */

import { deepFreeze, type Fail, isObject, show, TOOL_NAME } from "./_util.ts";
import type { JsonObject } from "./response_format.ts";

/** An OpenAI tool definition, as sent to the engine. */
export interface ToolDefinition {
  readonly type: "function";
  readonly function: {
    readonly name: string;
    readonly description?: string;
    readonly parameters?: JsonObject;
  };
}

/**
 * A tool offered to the model, and how a call of it goes into the answer
 * object: each key of `mapsTo` is an answer key, its value the argument
 * whose value it takes, or a list of arguments whose values it takes as an
 * array (`break_wall(x, y)` → `"break_wall": [x, y]`). Without `mapsTo` the
 * call's arguments object goes under the tool's name.
 */
export interface ProjectTool {
  readonly definition: ToolDefinition;
  readonly mapsTo?: Readonly<Record<string, string | readonly string[]>>;
}

/** A call of a tool, as the engine returned it: the function's name and its arguments as JSON text. */
export interface ToolCall {
  readonly id?: string;
  readonly name: string;
  readonly arguments: string;
}

/** How the model may call tools (OpenAI's `tool_choice`, the string forms). */
export type ToolChoice = "auto" | "required" | "none";

/** Reads the `tools` of a front matter: each defined once, each `maps_to` naming its parameters. */
export function parseTools(value: unknown, fail: Fail): readonly ProjectTool[] {
  if (!Array.isArray(value) || value.length === 0) {
    return fail("tools", "must be a non-empty list of tool definitions");
  }
  const names = new Set<string>();
  const tools = value.map((entry, i): ProjectTool => {
    const at = `tools[${i}]`;
    if (!isObject(entry)) return fail(at, "must be a mapping ({type: function, function: ...})");
    for (const inner of Object.keys(entry)) {
      if (!["type", "function", "maps_to"].includes(inner)) {
        fail(`${at}.${inner}`, "unknown key (known: type, function, maps_to)");
      }
    }
    if (entry.type !== undefined && entry.type !== "function") {
      fail(`${at}.type`, `must be "function", not ${show(entry.type)}`);
    }
    const fn = entry.function;
    if (!isObject(fn)) return fail(`${at}.function`, "must be a mapping with a 'name'");
    for (const inner of Object.keys(fn)) {
      if (!["name", "description", "parameters"].includes(inner)) {
        fail(`${at}.function.${inner}`, "unknown key (known: name, description, parameters)");
      }
    }
    if (typeof fn.name !== "string" || !TOOL_NAME.test(fn.name)) {
      fail(
        `${at}.function.name`,
        `must be letters, digits, _ or - (at most 64), not ${show(fn.name)}`,
      );
    }
    const name = fn.name as string;
    if (names.has(name)) fail(`${at}.function.name`, `${name} is defined twice`);
    names.add(name);
    if (fn.description !== undefined && typeof fn.description !== "string") {
      fail(`${at}.function.description`, "must be a string");
    }
    const parameters = fn.parameters;
    if (parameters !== undefined) {
      if (!isObject(parameters) || parameters.type !== "object") {
        fail(`${at}.function.parameters`, "must be a JSON Schema of an object ('type: object')");
      }
    }
    const properties = isObject(parameters) && isObject(parameters.properties)
      ? parameters.properties
      : {};
    let mapsTo: Record<string, string | readonly string[]> | undefined;
    if (entry.maps_to !== undefined) {
      if (!isObject(entry.maps_to) || Object.keys(entry.maps_to).length === 0) {
        return fail(`${at}.maps_to`, "must map answer keys to argument names");
      }
      mapsTo = {};
      for (const [answerKey, source] of Object.entries(entry.maps_to)) {
        const args = typeof source === "string" ? [source] : source;
        if (
          !Array.isArray(args) || args.length === 0 ||
          !args.every((arg) => typeof arg === "string")
        ) {
          fail(`${at}.maps_to.${answerKey}`, "must be an argument name or a list of them");
        }
        for (const arg of args as string[]) {
          if (!(arg in properties)) {
            fail(
              `${at}.maps_to.${answerKey}`,
              `names '${arg}', which ${name} has no parameter for`,
            );
          }
        }
        mapsTo[answerKey] = typeof source === "string" ? source : Object.freeze([...args]);
      }
    }
    return Object.freeze({
      definition: deepFreeze({
        type: "function" as const,
        function: {
          name,
          ...(typeof fn.description === "string" && { description: fn.description }),
          ...(isObject(parameters) && { parameters }),
        },
      }),
      ...(mapsTo && { mapsTo: Object.freeze(mapsTo) }),
    });
  });
  return Object.freeze(tools);
}
