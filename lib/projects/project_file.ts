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
 * naming the file, the key and the problem. The two larger keys are read in
 * modules of their own: `response_format` in `response_format.ts`, `tools` in
 * `project_tools.ts`.
 *
 * @module
 */

import { parse as parseYaml } from "yaml";
import { ConfigError } from "../config/config.ts";
import { isObject, show } from "./_util.ts";
import { type Experiment, parseExperiment, type Variant } from "./experiment.ts";
import { parseTools, type ProjectTool, type ToolChoice } from "./project_tools.ts";
import { parseResponseFormat, type ResponseFormat } from "./response_format.ts";

// The parts of a project, where callers have always imported them from.
export type { ProjectTool, ToolChoice } from "./project_tools.ts";
export type { ResponseFormat } from "./response_format.ts";
export type { Experiment, Variant } from "./experiment.ts";

/** Which turns of a project the response format and tools apply to. */
export type ApplyTo = "state" | "all";

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
  /** Its A/B test: the variants its sessions are dealt to; undefined: none. */
  readonly experiment: Experiment | undefined;
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
  "experiment",
  "allow_variant_request",
  "variants",
] as const;

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
    experiment: undefined,
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
  // vLLM honours one constraint per answer: with tool_choice auto the whole answer is held to
  // the schema (no tool call fits in it), with required (or a named tool) the schema is
  // dropped for the call's (vllm/entrypoints/openai/protocol.py, to_sampling_params).
  if (tools !== undefined && responseFormat !== undefined) {
    fail(
      "tools",
      "cannot be served with 'response_format': vLLM holds an answer to one of them (with " +
        "tool_choice auto the schema, so no tool is ever called; with required the tool " +
        "call, so the schema is dropped); put the actions in the schema as optional " +
        "properties (as prompts/maze.md does with break_wall) or drop one of the two keys",
    );
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

  const experiment = parseExperiment(name, data, hintTopic, fail);

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
    experiment,
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

/**
 * The shape of a turn of `project`: a state message's (`state`), or a chat
 * turn's; a `variant`'s model and response format replace the project's.
 */
export function turnShape(
  project: Project | undefined,
  state: boolean,
  variant?: Variant,
): TurnShape {
  if (project === undefined) return {};
  const structured = state || project.applyTo === "all";
  const model = variant?.model ?? project.model;
  const responseFormat = variant?.responseFormat ?? project.responseFormat;
  return {
    ...(model !== undefined && { model }),
    ...(structured && responseFormat && { responseFormat }),
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
  const project = parseProjectFile(name, file, text);
  return project.experiment === undefined ? project : await withVariantPrompts(project, file);
}

/**
 * `project` with the text of each variant's `prompt` file, read from beside
 * `file`; a file that cannot be read stops the start-up, naming it.
 */
async function withVariantPrompts(project: Project, file: string): Promise<Project> {
  const folder = file.includes("/") ? file.slice(0, file.lastIndexOf("/") + 1) : "";
  const variants: Variant[] = [];
  for (const variant of project.experiment!.variants) {
    if (variant.promptFile === undefined) {
      variants.push(variant);
      continue;
    }
    const path = folder + variant.promptFile;
    let text: string;
    try {
      text = await Deno.readTextFile(path);
    } catch (error) {
      throw new ConfigError(
        `${file}: front matter key 'variants' (${variant.name}).prompt: cannot read ${path}: ${
          (error as Error).message
        }`,
      );
    }
    if (text.trim() === "") {
      throw new ConfigError(
        `${file}: front matter key 'variants' (${variant.name}).prompt: ${path} is empty`,
      );
    }
    variants.push(Object.freeze({ ...variant, prompt: text.trim() }));
  }
  const experiment = Object.freeze({ ...project.experiment!, variants: Object.freeze(variants) });
  return Object.freeze({ ...project, experiment });
}
