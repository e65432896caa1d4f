/**
 * A project file, `prompts/{project}.md`: the system prompt, optionally after
 * a YAML front-matter block that declares what the project needs beyond it
 * (state and hint topics, a JSON Schema for its answers, tools, a model or
 * LoRA adapter, sampling defaults).
 *
 * ```md
 * ---
 * state_topic: true
 * hint_topic: true
 * response_format:
 *   name: maze_hint
 *   schema: { type: object, properties: { hint: { type: string } }, required: [hint] }
 * ---
 * # Maze guide
 * ...
 * ```
 *
 * A file without front matter is the system prompt as it stands. A front
 * matter that cannot be used stops the start-up with a {@linkcode ConfigError}
 * naming the file, the key and the problem.
 *
 * @module
 */

import { parse as parseYaml } from "yaml";
import { ConfigError } from "../config/config.ts";

/** A JSON Schema (or any JSON object), as read from the front matter. */
export type JsonObject = { readonly [key: string]: unknown };

/** OpenAI's structured-output request: `response_format: {type: "json_schema", ...}`. */
export interface ResponseFormat {
  readonly type: "json_schema";
  readonly json_schema: {
    readonly name: string;
    readonly schema: JsonObject;
    readonly strict?: boolean;
  };
}

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

/** Which turns of a project the response format and tools apply to. */
export type ApplyTo = "state" | "all";

/** How the model may call tools (OpenAI's `tool_choice`, the string forms). */
export type ToolChoice = "auto" | "required" | "none";

/** A project, as its file declares it. Frozen. */
export interface Project {
  readonly name: string;
  /** The file it was read from; undefined for one served with the general prompt. */
  readonly file: string | undefined;
  /** The system prompt: the file after its front matter, trimmed. */
  readonly prompt: string;
  /** Also take game state on `{prefix}{project}/state`. */
  readonly stateTopic: boolean;
  /** Answer state messages (and acknowledge control commands) on `{prefix}{project}/hint/{session_id}`. */
  readonly hintTopic: boolean;
  readonly responseFormat: ResponseFormat | undefined;
  readonly tools: readonly ProjectTool[] | undefined;
  readonly toolChoice: ToolChoice | undefined;
  /** The turns `responseFormat` and `tools` apply to: state messages only, or every turn. */
  readonly applyTo: ApplyTo;
  /** The served model or LoRA adapter the project's turns ask the engine for. */
  readonly model: string | undefined;
  /** Sampling defaults for the project's requests that set none. */
  readonly temperature: number | undefined;
  readonly maxTokens: number | undefined;
}

/** The keys a front matter may hold. */
export const FRONT_MATTER_KEYS = [
  "state_topic",
  "hint_topic",
  "response_format",
  "tools",
  "tool_choice",
  "apply_to",
  "model",
  "temperature",
  "max_tokens",
] as const;

const TOOL_NAME = /^[A-Za-z0-9_-]{1,64}$/;
const OPENING = /^---[ \t]*\r?\n/;
const CLOSING = /^---[ \t]*$/m;

/** A project with no front matter: `prompt` and nothing else, as before project files had any. */
export function plainProject(name: string, prompt: string, file?: string): Project {
  return Object.freeze({
    name,
    file,
    prompt,
    stateTopic: false,
    hintTopic: false,
    responseFormat: undefined,
    tools: undefined,
    toolChoice: undefined,
    applyTo: "all",
    model: undefined,
    temperature: undefined,
    maxTokens: undefined,
  });
}

/**
 * Parses the text of a project file.
 *
 * @throws {ConfigError} naming `file`, the key and the problem, for a front
 * matter that is not valid YAML or holds a key or value that cannot be used.
 */
export function parseProjectFile(name: string, file: string, text: string): Project {
  if (!OPENING.test(text)) return plainProject(name, text.trim(), file);
  const rest = text.replace(OPENING, "");
  const closing = CLOSING.exec(rest);
  if (!closing) {
    throw new ConfigError(
      `${file}: the front matter opened by '---' on the first line has no closing '---' line`,
    );
  }
  const yamlText = rest.slice(0, closing.index);
  const prompt = rest.slice(closing.index + closing[0].length).trim();
  let data: unknown;
  try {
    data = parseYaml(yamlText, { uniqueKeys: true });
  } catch (error) {
    const message = String((error as Error).message).split("\n")[0];
    throw new ConfigError(`${file}: the front matter is not valid YAML: ${message}`);
  }
  if (data === null || data === undefined) return plainProject(name, prompt, file);
  const fail = (key: string, problem: string): never => {
    throw new ConfigError(`${file}: front matter key '${key}': ${problem}`);
  };
  if (!isObject(data)) {
    throw new ConfigError(`${file}: the front matter must be a mapping of keys to values`);
  }
  for (const key of Object.keys(data)) {
    if (!(FRONT_MATTER_KEYS as readonly string[]).includes(key)) {
      fail(key, `unknown key (known: ${FRONT_MATTER_KEYS.join(", ")})`);
    }
  }
  const flag = (key: string): boolean => {
    const value = data[key];
    if (value === undefined) return false;
    if (typeof value !== "boolean") fail(key, `must be true or false, not ${show(value)}`);
    return value as boolean;
  };
  const stateTopic = flag("state_topic");
  const hintTopic = flag("hint_topic");

  const applyTo = data.apply_to ?? (stateTopic ? "state" : "all");
  if (applyTo !== "state" && applyTo !== "all") {
    fail("apply_to", `must be "state" or "all", not ${show(applyTo)}`);
  }
  if (applyTo === "state" && !stateTopic) {
    fail("apply_to", `is "state", but the project takes no state messages (state_topic: true)`);
  }

  const responseFormat = data.response_format === undefined
    ? undefined
    : parseResponseFormat(name, data.response_format, hintTopic, fail);
  const tools = data.tools === undefined ? undefined : parseTools(data.tools, fail);

  const toolChoice = data.tool_choice;
  if (toolChoice !== undefined) {
    if (toolChoice !== "auto" && toolChoice !== "required" && toolChoice !== "none") {
      fail("tool_choice", `must be "auto", "required" or "none", not ${show(toolChoice)}`);
    }
    if (tools === undefined) fail("tool_choice", "is set, but the project has no 'tools'");
  }

  const model = data.model;
  if (model !== undefined && (typeof model !== "string" || !/^\S{1,256}$/.test(model))) {
    fail("model", `must be a model or adapter name without spaces, not ${show(model)}`);
  }
  const temperature = data.temperature;
  if (
    temperature !== undefined &&
    (typeof temperature !== "number" || !(temperature >= 0 && temperature <= 2))
  ) {
    fail("temperature", `must be a number from 0 to 2, not ${show(temperature)}`);
  }
  const maxTokens = data.max_tokens;
  if (maxTokens !== undefined && (!Number.isSafeInteger(maxTokens) || (maxTokens as number) < 1)) {
    fail("max_tokens", `must be a whole number of at least 1, not ${show(maxTokens)}`);
  }

  return Object.freeze({
    name,
    file,
    prompt,
    stateTopic,
    hintTopic,
    responseFormat,
    tools,
    toolChoice: toolChoice as ToolChoice | undefined,
    applyTo: applyTo as ApplyTo,
    model: model as string | undefined,
    temperature: temperature as number | undefined,
    maxTokens: maxTokens as number | undefined,
  });
}

/** What a project asks of the engine for one turn, and how its answer is shaped. */
export interface TurnShape {
  readonly responseFormat?: ResponseFormat;
  readonly tools?: readonly ProjectTool[];
  readonly toolChoice?: ToolChoice;
  readonly model?: string;
  /** The answer is a hint object (a state message's): always a JSON object with `hint`. */
  readonly hint?: true;
}

/** The shape of a turn of `project`: a state message's (`state`), or a chat turn's. */
export function turnShape(project: Project | undefined, state: boolean): TurnShape {
  if (project === undefined) return {};
  const structured = state || project.applyTo === "all";
  return {
    ...(project.model !== undefined && { model: project.model }),
    ...(structured && project.responseFormat && { responseFormat: project.responseFormat }),
    ...(structured && project.tools && { tools: project.tools }),
    ...(structured && project.tools && project.toolChoice && { toolChoice: project.toolChoice }),
    ...(state && { hint: true as const }),
  };
}

/** Reads and parses `file`; undefined when there is no such file. */
export async function readProjectFile(name: string, file: string): Promise<Project | undefined> {
  let text: string;
  try {
    text = await Deno.readTextFile(file);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return undefined;
    throw error;
  }
  return parseProjectFile(name, file, text);
}

type Fail = (key: string, problem: string) => never;

function parseResponseFormat(
  project: string,
  value: unknown,
  hintTopic: boolean,
  fail: Fail,
): ResponseFormat {
  const key = "response_format";
  if (!isObject(value)) return fail(key, "must be a mapping with a 'schema' (and a 'name')");
  for (const inner of Object.keys(value)) {
    if (!["name", "schema", "strict"].includes(inner)) {
      fail(`${key}.${inner}`, "unknown key (known: name, schema, strict)");
    }
  }
  const name = value.name ?? `${project}_answer`;
  if (typeof name !== "string" || !TOOL_NAME.test(name)) {
    fail(`${key}.name`, `must be letters, digits, _ or - (at most 64), not ${show(name)}`);
  }
  const schema = value.schema;
  if (!isObject(schema)) return fail(`${key}.schema`, "must be a JSON Schema (a mapping)");
  if (schema.type !== "object") {
    fail(`${key}.schema`, `must describe an object ('type: object'), not ${show(schema.type)}`);
  }
  if (schema.properties !== undefined && !isObject(schema.properties)) {
    fail(`${key}.schema.properties`, "must be a mapping of property names to schemas");
  }
  if (hintTopic) {
    const hint = isObject(schema.properties) ? schema.properties.hint : undefined;
    if (!isObject(hint) || hint.type !== "string") {
      fail(
        `${key}.schema`,
        "must declare a string 'hint' property: answers on the hint topic always carry one",
      );
    }
  }
  const strict = value.strict;
  if (strict !== undefined && typeof strict !== "boolean") {
    fail(`${key}.strict`, `must be true or false, not ${show(strict)}`);
  }
  return Object.freeze({
    type: "json_schema",
    json_schema: Object.freeze({
      name: name as string,
      schema: deepFreeze(schema),
      ...(strict !== undefined && { strict: strict as boolean }),
    }),
  });
}

function parseTools(value: unknown, fail: Fail): readonly ProjectTool[] {
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

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function show(value: unknown): string {
  const text = JSON.stringify(value) ?? String(value);
  return text.length > 60 ? `${text.slice(0, 60)}…` : text;
}

function deepFreeze<T>(value: T): T {
  if (typeof value === "object" && value !== null) {
    for (const inner of Object.values(value)) deepFreeze(inner);
    Object.freeze(value);
  }
  return value;
}
