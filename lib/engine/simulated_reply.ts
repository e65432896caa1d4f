/**
 * What the simulated engine's model says, and that reply as vLLM's whole
 * (not streamed) `chat.completion` (see `simulator.ts` for the server).
 *
 * Replies are deterministic and depend on the conversation received, so a
 * client can see its history: `[Maze guide] Turn 2: you said "hi".` names the
 * system prompt's first line, counts the user turns and quotes the last one.
 * A user turn with images (OpenAI content parts) is answered with what their
 * headers say, `... you said "what is this?". Saw 1 image: png 64×48.`; one with audio with
 * what it heard, `Heard 1 audio clip: wav/pcm 0.85 s, 13,614 bytes.`.
 *
 * What vLLM does for structured output, tools and LoRA adapters, too:
 *
 * - `response_format` `json_schema`: the answer is an object valid for the
 *   schema: the usual text in its first string property, the least value of
 *   each type (or its `const`, first `enum`, `default`, `minimum`, `minItems`)
 *   in the other required ones; `json_object`: `{"response": text}`. When the
 *   last user message is a maze state (`player_pos`, `visible_map` with 0 for
 *   a wall) whose player is boxed in and the schema has a `break_wall`
 *   property, the object breaks the first wall beside the player, looking
 *   east, south, west, north (`"break_wall": [x, y]`).
 * - `tools`, as vLLM serves them (its `tool_choice` defaults to `"auto"`):
 *   `"none"` calls nothing; `"auto"` (only served with a tool-call parser,
 *   see `vllm_refusals.ts`) calls one tool after the usual text, unless a
 *   `response_format` holds the whole answer to its schema (then no tool can
 *   be called: vLLM's choice); `"required"` or a named function: a call and
 *   no text, the `response_format` ignored. The tool called is (first rule
 *   that holds) the one `tool_choice` names; one the last user message names
 *   as a word; `break_wall` for a boxed-in maze state, at the wall the schema
 *   rule above picks; with `"required"`, the first tool. The arguments are
 *   the least values of the tool's parameters schema (defaults where given).
 *   Calls are in vLLM's format (`tool_calls`, streamed as a first piece with
 *   the id and name and then pieces of the arguments;
 *   `finish_reason: "tool_calls"`).
 * - reasoning (the simulator's `thinking`): QwQ's answers open inside the
 *   thinking block (its chat template opens it) and close it with
 *   `</think>`; Qwen3's open it with `<think>`. With a reasoning parser the
 *   reasoning is returned apart from the answer. Without one, an answer held
 *   to a JSON schema from its first token has no room for reasoning.
 * - `model`: one of the adapters (vLLM's `--lora-modules`): the answer starts
 *   with `{adapter}: `.
 *
 * Told how good each model is (`quality`, for tests of experiments), every
 * answer starts with a signature, `<sim model=maze-lora-v2 prompt=1f0c3a9e
 * quality=0.6 outcome=good> `: the model or adapter asked, an FNV-1a hash of
 * the system prompt it got (so a test can tell which variant answered), and
 * an outcome drawn with the model's quality as the probability of `good`
 * (from a hash of the conversation: the same conversation, the same outcome).
 * A `bad` answer held to a JSON format is cut by its last character: not valid
 * JSON, as a weaker model's game answer may be.
 *
 * @module
 */

import { mixedHash32 } from "../_util.ts";
import { encode } from "gpt-tokenizer/encoding/cl100k_base";
import { boxedIn } from "../games/maze_state.ts";
import { heardAudio } from "./audio_content.ts";
import { seenImages, textOf } from "./multimodal.ts";

/** The parts of a chat completion request the simulated engine reads. */
export interface ChatBody {
  model?: string;
  messages?: { role: string; content: unknown }[];
  stream?: boolean;
  stream_options?: { include_usage?: boolean };
  max_tokens?: number;
  max_completion_tokens?: number;
  chat_template_kwargs?: { enable_thinking?: boolean };
  response_format?: { type?: string; json_schema?: { schema?: unknown } };
  tools?: { type?: string; function?: { name?: string; parameters?: unknown } }[];
  tool_choice?: string | { type?: string; function?: { name?: string } };
}

// Text that looks like a special token is counted as text, as a chat template's content is.
const AS_TEXT = { disallowedSpecial: new Set<string>() };

/** The simulated model's tokens of `text` (cl100k_base's, standing in for the model's own). */
export function tokenIds(text: string): number[] {
  return encode(text, AS_TEXT);
}

/** A tool call of a reply, as vLLM streams it. */
export interface SimulatedCall {
  readonly id: string;
  readonly name: string;
  readonly arguments: string;
}

/** A reply of the simulated model to one request. */
export interface SimulatedReply {
  /** Reasoning split off the answer by a reasoning parser, a token each. */
  readonly reasoning: readonly string[];
  /** The answer's text, a token (a word and its trailing space) each, cut at the token limit. */
  readonly tokens: readonly string[];
  /** The tool called, unless none was or the answer was cut. */
  readonly calls: readonly SimulatedCall[];
  readonly finishReason: "stop" | "length" | "tool_calls";
  /** The reply's tokens, the tool call's included (`usage.completion_tokens`). */
  readonly completionTokens: number;
}

/** How {@linkcode simulatedReply} answers beyond what the request says. */
export interface ReplyOptions {
  /** The LoRA adapter asked for, whose name the answer starts with. */
  readonly adapter?: string;
  /** Words of filler appended to the answer. */
  readonly fillerTokens: number;
  /**
   * How the model reasons before it answers: `opened`: inside a block its
   * template opened, closed by `</think>` (QwQ); `tagged`: in a
   * `<think>...</think>` block (Qwen3); undefined: not at all.
   */
  readonly thinking?: "opened" | "tagged";
  /** A reasoning parser returns the reasoning apart from the answer. */
  readonly splitReasoning?: boolean;
  /** Most tokens the answer may have (`max_tokens`). */
  readonly maxTokens: number;
  /**
   * The model asked and how often (0 to 1) its answers are good: the answer
   * is signed, and a bad one held to a JSON format is not valid JSON.
   * @default {undefined} (not signed)
   */
  readonly graded?: { readonly model: string; readonly quality: number };
}

/** The simulated model's reply to `body`, by the rules in this module's documentation. */
export function simulatedReply(body: ChatBody, options: ReplyOptions): SimulatedReply {
  const messages = body.messages ?? [];
  const outcome = options.graded && gradedOutcome(messages, options.graded);
  const text = (outcome ? `${outcome.signature} ` : "") +
    (options.adapter ? `${options.adapter}: ` : "") +
    replyText(messages, options.fillerTokens);
  const choice = body.tool_choice ?? (body.tools?.length ? "auto" : undefined);
  // A guided answer (a required or named call) is the call alone; an auto one is held to the
  // response_format's schema when there is one, where no tool call fits.
  const guided = choice === "required" || typeof choice === "object";
  const call = guided || (choice === "auto" && !body.response_format) ? toolCall(body) : undefined;
  const shaped = guided ? "" : call ? text : formatted(text, body.response_format, messages);
  // A bad answer to a JSON format is cut short: the client cannot parse it.
  const content = outcome && !outcome.good && body.response_format !== undefined && shaped !== ""
    ? shaped.slice(0, -1)
    : shaped;
  // Held to a grammar from its first token (no parser to wait for the reasoning's end), a
  // model has no room to reason.
  const constrained = guided || body.response_format !== undefined;
  const thinks = options.thinking !== undefined && (options.splitReasoning || !constrained);
  const thought = thinks ? reasoningText(messages) : "";
  const reasoning = options.splitReasoning ? wordTokens(thought) : [];
  const inline = thinks && !options.splitReasoning
    ? (options.thinking === "tagged"
      ? `<think>\n${thought}\n</think>\n\n`
      : `${thought}\n</think>\n\n`)
    : "";
  const all = wordTokens(inline + content);
  const tokens = all.slice(0, Math.max(0, options.maxTokens - reasoning.length));
  const truncated = tokens.length < all.length;
  const calls = call && !truncated ? [{ ...call, id: `chatcmpl-tool-${crypto.randomUUID()}` }] : [];
  const finishReason = truncated ? "length" : calls.length > 0 ? "tool_calls" : "stop";
  const callTokens = calls.length > 0 ? tokenIds(call!.name + call!.arguments).length : 0;
  return {
    reasoning,
    tokens,
    calls,
    finishReason,
    completionTokens: reasoning.length + tokens.length + callTokens,
  };
}

/** `reply` as vLLM answers a chat completion that is not streamed. */
export function completionObject(
  meta: { readonly id: string; readonly created: number; readonly model: string },
  reply: SimulatedReply,
  usage: { prompt_tokens: number; completion_tokens: number; total_tokens: number },
): Record<string, unknown> {
  const { reasoning, tokens, calls, finishReason } = reply;
  return {
    id: meta.id,
    object: "chat.completion",
    created: meta.created,
    model: meta.model,
    choices: [{
      index: 0,
      message: {
        role: "assistant",
        content: calls.length > 0 && tokens.length === 0 ? null : tokens.join(""),
        ...(reasoning.length > 0 && { reasoning_content: reasoning.join("") }),
        ...(calls.length > 0 && {
          tool_calls: calls.map(({ id, name, arguments: args }) => ({
            id,
            type: "function",
            function: { name, arguments: args },
          })),
        }),
      },
      finish_reason: finishReason,
    }],
    usage,
  };
}

/** The prompt as a chat template would render it (tools and schema first), as token ids. */
export function promptTokenIds(
  messages: { role: string; content: unknown }[],
  offered = "",
): number[] {
  const rendered = (offered === "" ? "" : `<|im_start|>tools\n${offered}<|im_end|>\n`) +
    messages.map((m) => `<|im_start|>${m.role}\n${textOf(m.content)}<|im_end|>\n`)
      .join("") +
    "<|im_start|>assistant\n";
  return tokenIds(rendered);
}

/**
 * The signature of a graded answer and its outcome: good with the model's
 * quality as the probability, drawn from a hash of the conversation.
 */
function gradedOutcome(
  messages: { role: string; content: unknown }[],
  graded: { readonly model: string; readonly quality: number },
): { readonly signature: string; readonly good: boolean } {
  const system = textOf(messages.find((m) => m.role === "system")?.content ?? "");
  const conversation = messages.map((m) => `${m.role}:${textOf(m.content)}`).join("\n");
  const draw = mixedHash32(`${graded.model}\n${conversation}`) / 0x1_0000_0000;
  const good = draw < graded.quality;
  const prompt = mixedHash32(system).toString(16).padStart(8, "0");
  return {
    signature: `<sim model=${graded.model} prompt=${prompt} quality=${graded.quality} outcome=${
      good ? "good" : "bad"
    }>`,
    good,
  };
}

/** The usual answer: the system prompt's first line, the turn count and the last user message. */
function replyText(messages: { role: string; content: unknown }[], filler: number): string {
  const system = messages.find((m) => m.role === "system");
  const users = messages.filter((m) => m.role === "user");
  const tag = system
    ? String(system.content).split("\n").find((line) => line.trim() !== "")?.replace(/^#+\s*/, "")
      .slice(0, 60)
    : undefined;
  let text = `${tag ? `[${tag}] ` : ""}Turn ${users.length}: you said "${lastQuoted(messages)}".`;
  text += seenImages(messages) + heardAudio(messages);
  for (let i = 0; i < filler; i++) text += ` w${i}`;
  return text;
}

function lastQuoted(messages: { role: string; content: unknown }[]): string {
  const last = textOf(messages.filter((m) => m.role === "user").at(-1)?.content);
  return last.length > 200 ? `${last.slice(0, 200)}...` : last;
}

/** Reasoning about the conversation, as thinking models start their answers. */
function reasoningText(messages: { role: string; content: unknown }[]): string {
  return `The user said "${lastQuoted(messages)}". I should answer briefly.`;
}

/** Text as tokens (a word and its trailing space each). */
function wordTokens(text: string): string[] {
  return text.match(/\S+\s*|\s+/g) ?? [];
}

/** The answer in the requested `response_format`. */
function formatted(
  text: string,
  format: ChatBody["response_format"],
  messages: { role: string; content: unknown }[],
): string {
  if (format?.type === "json_schema") {
    const schema = format.json_schema?.schema as { properties?: Record<string, unknown> };
    const answer = sample(schema, { text });
    const wall = schema?.properties?.break_wall !== undefined &&
      boxedIn(textOf(messages.filter((m) => m.role === "user").at(-1)?.content));
    if (wall && typeof answer === "object" && answer !== null) {
      (answer as Record<string, unknown>).break_wall = wall;
    }
    return JSON.stringify(answer);
  }
  if (format?.type === "json_object") return JSON.stringify({ response: text });
  return text;
}

/**
 * The least value valid for `schema` (its `const`, first `enum`, `default`,
 * `minimum`, `minItems` copies; `""`, `0`, `false` otherwise), with
 * `fill.text` in the first string met (and that property included even when
 * not required); of an object, the required properties and those with a default. Covers the JSON Schema that structured output uses.
 */
export function sample(schema: unknown, fill: { text?: string }): unknown {
  if (typeof schema !== "object" || schema === null) return null;
  const s = schema as Record<string, unknown>;
  if ("const" in s) return s.const;
  if (Array.isArray(s.enum) && s.enum.length > 0) return s.enum[0];
  for (const key of ["anyOf", "oneOf", "allOf"]) {
    if (Array.isArray(s[key]) && (s[key] as unknown[]).length > 0) {
      return sample((s[key] as unknown[])[0], fill);
    }
  }
  const type = Array.isArray(s.type) ? s.type.find((t) => t !== "null") ?? "null" : s.type;
  if (type === "string" && fill.text !== undefined) {
    const text = fill.text;
    fill.text = undefined;
    return typeof s.maxLength === "number" ? text.slice(0, s.maxLength) : text;
  }
  if ("default" in s) return s.default;
  switch (type ?? (s.properties ? "object" : undefined)) {
    case "object": {
      const properties = (s.properties ?? {}) as Record<string, unknown>;
      const required = Array.isArray(s.required) ? s.required : [];
      const object: Record<string, unknown> = {};
      for (const [name, inner] of Object.entries(properties)) {
        const isString = (inner as { type?: unknown } | null)?.type === "string";
        const hasDefault = typeof inner === "object" && inner !== null && "default" in inner;
        if (required.includes(name) || hasDefault || (fill.text !== undefined && isString)) {
          object[name] = sample(inner, fill);
        }
      }
      return object;
    }
    case "array": {
      const count = typeof s.minItems === "number" ? s.minItems : 0;
      return Array.from({ length: count }, () => sample(s.items, fill));
    }
    case "string":
      return "x".repeat(typeof s.minLength === "number" ? s.minLength : 0);
    case "integer":
    case "number": {
      const least = typeof s.minimum === "number"
        ? s.minimum
        : typeof s.exclusiveMinimum === "number"
        ? s.exclusiveMinimum + (type === "integer" ? 1 : 0.5)
        : 0;
      const bounded = typeof s.maximum === "number" ? Math.min(least, s.maximum) : least;
      return type === "integer" ? Math.ceil(bounded) : bounded;
    }
    case "boolean":
      return false;
    default:
      return null;
  }
}

/** The tool the simulated model calls, by the rules in this module's documentation. */
function toolCall(body: ChatBody): { name: string; arguments: string } | undefined {
  const tools = (body.tools ?? []).filter((t) => typeof t?.function?.name === "string");
  if (tools.length === 0 || body.tool_choice === "none") return undefined;
  const find = (name: string) => tools.find((t) => t.function!.name === name);
  const call = (tool: (typeof tools)[number], args?: Record<string, unknown>) => {
    const least = sample(tool.function!.parameters ?? { type: "object" }, {});
    return {
      name: tool.function!.name!,
      arguments: JSON.stringify({ ...(least as object), ...args }),
    };
  };
  const choice = body.tool_choice ?? "auto";
  if (typeof choice === "object" && choice?.function?.name) {
    const named = find(choice.function.name);
    if (named) return call(named);
  }
  const last = String(body.messages?.filter((m) => m.role === "user").at(-1)?.content ?? "");
  const words = new Set(last.match(/[A-Za-z0-9_-]+/g) ?? []);
  const mentioned = tools.find((t) => words.has(t.function!.name!));
  if (mentioned) return call(mentioned);
  const breakWall = find("break_wall");
  const wall = breakWall && boxedIn(last);
  if (breakWall && wall) return call(breakWall, { x: wall[0], y: wall[1] });
  if (choice === "required") return call(tools[0]);
  return undefined;
}
