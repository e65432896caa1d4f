/**
 * A simulated OpenAI-compatible engine that behaves like vLLM, for client
 * developers without a GPU and for tests: `/health`, `/v1/models`,
 * `/v1/chat/completions` (streaming or not, with usage), `/tokenize`,
 * `/metrics`, vLLM's context-length error, and latency that grows with the
 * number of requests it is running.
 *
 * Replies are deterministic and depend on the conversation received, so a
 * client can see its history: `[Maze guide] Turn 2: you said "hi".` names the
 * system prompt's first line, counts the user turns and quotes the last one.
 * A user turn with images (OpenAI content parts) is answered with what their
 * headers say, `... you said "what is this?". Saw 1 image: png 64×48.`, and
 * they count in `usage.prompt_tokens` roughly as vLLM counts Qwen2.5-VL's (a
 * token per 28×28 pixels, plus 2; `imageTokens` in `protocol/images.ts`).
 *
 * What vLLM does for structured output, tools and LoRA adapters, too:
 *
 * - `response_format` `json_schema`: the answer is an object valid for the
 *   schema: the usual text in its first string property, the least value of
 *   each type (or its `const`, first `enum`, `default`, `minimum`, `minItems`)
 *   in the other required ones; `json_object`: `{"response": text}`.
 * - `tools` (unless `tool_choice` is `"none"`): the model calls one tool, in
 *   vLLM's format (`tool_calls`, streamed as a first piece with the id and
 *   name and then pieces of the arguments; `finish_reason: "tool_calls"`),
 *   after its usual text, when (first rule that holds) `tool_choice` names a
 *   function; the last user message names an offered tool as a word; the last
 *   user message is a maze state (`player_pos`, `visible_map` with 0 for a
 *   wall) whose player is boxed in, and `break_wall` is offered: it breaks the
 *   first wall beside the player, looking east, south, west, north;
 *   `tool_choice` is `"required"`: the first tool. The arguments are the
 *   least values of the tool's parameters schema (defaults where given).
 * - `model`: the served model, or one of `adapters` (vLLM's `--lora-modules`),
 *   whose answers start with `{adapter}: `; another name is answered 404 as
 *   vLLM answers it.
 *
 * @module
 */

import { encode } from "gpt-tokenizer/encoding/cl100k_base";
import { abortableSleep } from "../_util.ts";
import { boxedIn } from "../games/maze_state.ts";
import { imageTokensOf, seenImages, textOf } from "./multimodal.ts";
import { PrefixCache } from "./prefix_cache.ts";

/** Whether simulated answers carry a `<think>` block. */
export type SimulatedThinking = "never" | "always" | "template";

/** Options of {@linkcode startSimulator}. */
export interface SimulatorOptions {
  /**
   * Port to listen on; 0 picks a free one.
   * @default {0}
   */
  readonly port?: number;
  /**
   * Host to bind.
   * @default {"127.0.0.1"}
   */
  readonly hostname?: string;
  /**
   * Model id served.
   * @default {"sim-model"}
   */
  readonly model?: string;
  /**
   * Context length, in tokens: longer prompts get vLLM's 400.
   * @default {4096}
   */
  readonly maxModelLen?: number;
  /**
   * Milliseconds to the first token.
   * @default {50}
   */
  readonly ttftMs?: number;
  /**
   * Milliseconds between tokens with one request running.
   * @default {15}
   */
  readonly itlMs?: number;
  /**
   * How much each further running request slows every token down:
   * the gap is `itlMs * (1 + slowdown * (running - 1))`, as batches get bigger.
   * @default {0.005}
   */
  readonly batchSlowdown?: number;
  /**
   * Words of filler appended to each answer (longer answers, for benchmarks).
   * @default {0}
   */
  readonly fillerTokens?: number;
  /**
   * `always`: every answer starts with a `<think>` block (like QwQ);
   * `template`: unless `chat_template_kwargs.enable_thinking` is false (like Qwen3);
   * `never`: no reasoning.
   * @default {"never"}
   */
  readonly thinking?: SimulatedThinking;
  /**
   * Extra milliseconds to the first token per prompt token not found in the
   * prefix cache (prefill work); 0 makes the cache invisible in timing.
   * @default {0}
   */
  readonly prefillMsPerToken?: number;
  /**
   * Blocks of 16 tokens the prefix cache holds.
   * @default {65536}
   */
  readonly prefixCacheBlocks?: number;
  /**
   * When set, `/v1/*` requires `Authorization: Bearer <apiKey>`, as `vllm serve --api-key` does.
   */
  readonly apiKey?: string;
  /**
   * LoRA adapters served beside the model (vLLM's `--lora-modules`): a request
   * may name one as its `model`.
   * @default {[]}
   */
  readonly adapters?: readonly string[];
}

/**
 * A fault the simulator can be told to show, for tests of what the service
 * does when the engine misbehaves: `error`: every endpoint answers 500 (a dead
 * engine core); `hang`: chat requests are accepted and never answered; `drop`:
 * streams are cut after two tokens.
 */
export type SimulatedFault = "error" | "hang" | "drop";

/** A running simulator. */
export interface Simulator {
  /** The fault shown now; set it to start one, `undefined` to end it. */
  fault: SimulatedFault | undefined;
  /** Base URL including `/v1`. */
  readonly url: string;
  readonly port: number;
  /** The request bodies received by `/v1/chat/completions`, oldest first (the last 1000). */
  readonly received: readonly Record<string, unknown>[];
  /** Requests running now. */
  readonly running: number;
  close(): Promise<void>;
}

interface ChatBody {
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

const AS_TEXT = { disallowedSpecial: new Set<string>() };
const ENCODER = new TextEncoder();

/** Starts a simulated engine. */
export function startSimulator(options: SimulatorOptions = {}): Promise<Simulator> {
  const model = options.model ?? "sim-model";
  const maxModelLen = options.maxModelLen ?? 4096;
  const ttftMs = options.ttftMs ?? 50;
  const itlMs = options.itlMs ?? 15;
  const slowdown = options.batchSlowdown ?? 0.005;
  const received: Record<string, unknown>[] = [];
  const prefixCache = new PrefixCache(options.prefixCacheBlocks ?? 65536);
  const prefillMsPerToken = options.prefillMsPerToken ?? 0;
  let running = 0;
  let requestsTotal = 0;
  let promptTokensTotal = 0;
  let generationTokensTotal = 0;

  const tokenGap = () => itlMs * (1 + slowdown * Math.max(0, running - 1));

  const authorized = (request: Request) =>
    options.apiKey === undefined ||
    request.headers.get("authorization") === `Bearer ${options.apiKey}`;

  async function chat(request: Request): Promise<Response> {
    let body: ChatBody;
    try {
      body = await request.json();
    } catch {
      return error(400, "request body is not valid JSON");
    }
    if (!Array.isArray(body.messages) || body.messages.length === 0) {
      return error(400, "'messages' must be a non-empty array");
    }
    received.push(body as Record<string, unknown>);
    if (received.length > 1000) received.shift();
    const adapter = body.model !== undefined && body.model !== model ? body.model : undefined;
    if (adapter !== undefined && !(options.adapters ?? []).includes(adapter)) {
      return error(404, `The model \`${adapter}\` does not exist.`);
    }

    const prompt = promptTokenIds(
      body.messages,
      body.tools || body.response_format ? JSON.stringify([body.tools, body.response_format]) : "",
    );
    // Images count roughly as vLLM counts Qwen2.5-VL's (`imageTokens`): a token per 28×28 pixels.
    const promptTokens = prompt.length +
      body.messages.reduce((sum, m) => sum + imageTokensOf(m.content), 0);
    const maxTokens = body.max_completion_tokens ?? body.max_tokens ?? maxModelLen - promptTokens;
    if (promptTokens + maxTokens > maxModelLen) {
      return error(
        400,
        `This model's maximum context length is ${maxModelLen} tokens. However, you requested ${
          promptTokens + maxTokens
        } tokens (${promptTokens} in the messages, ${maxTokens} in the completion). Please reduce the length of the messages or completion.`,
      );
    }
    const thinks = options.thinking === "always" ||
      (options.thinking === "template" && body.chat_template_kwargs?.enable_thinking !== false);
    const text = (adapter ? `${adapter}: ` : "") +
      replyText(body.messages, options.fillerTokens ?? 0);
    const call = toolCall(body);
    const content = call ? text : formatted(text, body.response_format);
    const all = wordTokens(thinks ? thinking(body.messages) + content : content);
    const tokens = all.slice(0, Math.max(0, maxTokens));
    const truncated = tokens.length < all.length;
    const calls = call && !truncated
      ? [{ ...call, id: `chatcmpl-tool-${crypto.randomUUID()}` }]
      : [];
    const finishReason = truncated ? "length" : calls.length > 0 ? "tool_calls" : "stop";
    const callTokens = calls.length > 0 ? encode(call!.name + call!.arguments, AS_TEXT).length : 0;
    const usage = {
      prompt_tokens: promptTokens,
      completion_tokens: tokens.length + callTokens,
      total_tokens: promptTokens + tokens.length + callTokens,
    };
    const id = `chatcmpl-sim-${++requestsTotal}`;
    const created = Math.floor(Date.now() / 1000);
    const firstTokenMs = ttftMs + prefillMsPerToken * (promptTokens - prefixCache.lookup(prompt));
    running++;
    promptTokensTotal += promptTokens;
    generationTokensTotal += tokens.length;

    if (!body.stream) {
      try {
        await abortableSleep(firstTokenMs + tokenGap() * Math.max(0, tokens.length - 1));
      } finally {
        running--;
      }
      return Response.json({
        id,
        object: "chat.completion",
        created,
        model,
        choices: [{
          index: 0,
          message: {
            role: "assistant",
            content: calls.length > 0 && tokens.length === 0 ? null : tokens.join(""),
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
      });
    }

    const chunk = (delta: Record<string, unknown>, finish: string | null) =>
      ENCODER.encode(`data: ${
        JSON.stringify({
          id,
          object: "chat.completion.chunk",
          created,
          model,
          choices: [{ index: 0, delta, finish_reason: finish }],
        })
      }\n\n`);
    const includeUsage = body.stream_options?.include_usage === true;
    // The client going away cancels the body stream: stop generating, as vLLM aborts the request.
    const gone = new AbortController();
    const signal = gone.signal;
    const stream = new ReadableStream<Uint8Array>({
      cancel() {
        gone.abort();
      },
      async start(controller) {
        try {
          controller.enqueue(chunk({ role: "assistant", content: "" }, null));
          if (firstTokenMs > 0) await abortableSleep(firstTokenMs, signal);
          for (let i = 0; i < tokens.length; i++) {
            if (fault === "drop" && i === 2) throw new Error("connection dropped");
            const gap = tokenGap();
            if (i > 0 && gap > 0) await abortableSleep(gap, signal);
            controller.enqueue(chunk({ content: tokens[i] }, null));
          }
          // vLLM's tool-call stream: the id, type and name first, then the arguments in pieces.
          for (const [index, { id, name, arguments: args }] of calls.entries()) {
            controller.enqueue(chunk({
              tool_calls: [{ index, id, type: "function", function: { name, arguments: "" } }],
            }, null));
            for (const piece of args.match(/.{1,16}/gs) ?? []) {
              controller.enqueue(
                chunk({ tool_calls: [{ index, function: { arguments: piece } }] }, null),
              );
            }
          }
          controller.enqueue(chunk({}, finishReason));
          if (includeUsage) {
            controller.enqueue(ENCODER.encode(`data: ${
              JSON.stringify({
                id,
                object: "chat.completion.chunk",
                created,
                model,
                choices: [],
                usage,
              })
            }\n\n`));
          }
          controller.enqueue(ENCODER.encode("data: [DONE]\n\n"));
          controller.close();
        } catch (cause) {
          // Cancelled by the client, or a dropped connection to show.
          if (!signal.aborted) controller.error(cause);
        } finally {
          running--;
        }
      },
    });
    return new Response(stream, {
      headers: { "content-type": "text/event-stream", "cache-control": "no-cache" },
    });
  }

  async function tokenize(request: Request): Promise<Response> {
    const body = await request.json().catch(() => ({})) as {
      prompt?: string;
      messages?: ChatBody["messages"];
    };
    const tokens = body.messages
      ? encode(body.messages.map((m) => String(m.content)).join("\n"), AS_TEXT)
      : encode(String(body.prompt ?? ""), AS_TEXT);
    return Response.json({ count: tokens.length, max_model_len: maxModelLen, tokens });
  }

  const metrics = () =>
    new Response(
      [
        `vllm:num_requests_running{model_name="${model}"} ${running}`,
        `vllm:request_success_total{model_name="${model}"} ${requestsTotal}`,
        `vllm:prompt_tokens_total{model_name="${model}"} ${promptTokensTotal}`,
        `vllm:generation_tokens_total{model_name="${model}"} ${generationTokensTotal}`,
        `vllm:prefix_cache_queries_total{model_name="${model}"} ${prefixCache.queries}`,
        `vllm:prefix_cache_hits_total{model_name="${model}"} ${prefixCache.hits}`,
        "",
      ].join("\n"),
      { headers: { "content-type": "text/plain; version=0.0.4" } },
    );

  let fault: SimulatedFault | undefined;
  const hanging = new Set<() => void>();

  const handler = (request: Request): Response | Promise<Response> => {
    const { pathname } = new URL(request.url);
    if (fault === "error" && pathname !== "/metrics") return error(500, "EngineCore died");
    if (fault === "hang" && pathname === "/v1/chat/completions") {
      return new Promise((resolve) => {
        const release = () => {
          hanging.delete(release);
          resolve(error(503, "released"));
        };
        hanging.add(release);
        request.signal.addEventListener("abort", release);
      });
    }
    if (pathname === "/health") return new Response(null, { status: 200 });
    if (pathname === "/metrics") return metrics();
    if (pathname === "/tokenize" && request.method === "POST") return tokenize(request);
    if (pathname.startsWith("/v1/") && !authorized(request)) return error(401, "Unauthorized");
    if (pathname === "/v1/models") {
      return Response.json({
        object: "list",
        data: [model, ...(options.adapters ?? [])].map((id) => ({
          id,
          object: "model",
          created: 0,
          owned_by: "vllm",
          root: id,
          ...(id !== model && { parent: model }),
          max_model_len: maxModelLen,
        })),
      });
    }
    if (pathname === "/v1/chat/completions" && request.method === "POST") return chat(request);
    return error(404, `no route for ${request.method} ${pathname}`);
  };

  return new Promise((resolve) => {
    const server = Deno.serve({
      port: options.port ?? 0,
      hostname: options.hostname ?? "127.0.0.1",
      onListen: () => {},
    }, handler);
    const { port } = server.addr as Deno.NetAddr;
    resolve({
      url: `http://${options.hostname ?? "127.0.0.1"}:${port}/v1`,
      port,
      received,
      get running() {
        return running;
      },
      get fault() {
        return fault;
      },
      set fault(value) {
        fault = value;
        if (value !== "hang") { for (const release of [...hanging]) release(); }
      },
      close: () => {
        for (const release of [...hanging]) release();
        return server.shutdown();
      },
    });
  });
}

/** vLLM's error body: `{"error": {"message", "type", "param", "code"}}`. */
function error(status: number, message: string): Response {
  const type = status === 400
    ? "BadRequestError"
    : status === 401
    ? "Unauthorized"
    : "NotFoundError";
  return Response.json({ error: { message, type, param: null, code: status } }, { status });
}

/** The prompt as a chat template would render it (tools and schema first), as token ids. */
function promptTokenIds(messages: { role: string; content: unknown }[], offered = ""): number[] {
  const rendered = (offered === "" ? "" : `<|im_start|>tools\n${offered}<|im_end|>\n`) +
    messages.map((m) => `<|im_start|>${m.role}\n${textOf(m.content)}<|im_end|>\n`)
      .join("") +
    "<|im_start|>assistant\n";
  return encode(rendered, AS_TEXT);
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
  text += seenImages(messages);
  for (let i = 0; i < filler; i++) text += ` w${i}`;
  return text;
}

function lastQuoted(messages: { role: string; content: unknown }[]): string {
  const last = textOf(messages.filter((m) => m.role === "user").at(-1)?.content);
  return last.length > 200 ? `${last.slice(0, 200)}...` : last;
}

/** A reasoning block about the conversation, as thinking models open their answers. */
function thinking(messages: { role: string; content: unknown }[]): string {
  return `<think>\nThe user said "${lastQuoted(messages)}". I should answer briefly.\n</think>\n\n`;
}

/** Text as tokens (a word and its trailing space each). */
function wordTokens(text: string): string[] {
  return text.match(/\S+\s*|\s+/g) ?? [];
}

/** The answer in the requested `response_format`. */
function formatted(text: string, format: ChatBody["response_format"]): string {
  if (format?.type === "json_schema") {
    return JSON.stringify(sample(format.json_schema?.schema, { text }));
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
function sample(schema: unknown, fill: { text?: string }): unknown {
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
  const choice = body.tool_choice;
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

if (import.meta.main) {
  const port = Number(Deno.args[0] ?? 8000);
  const sim = await startSimulator({ port });
  console.log(`simulated engine on ${sim.url}`);
}
