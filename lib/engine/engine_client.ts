/**
 * The one place that talks to the engine: a streaming chat completion through
 * the `openai` client, with engine failures mapped to protocol error codes.
 *
 * Only a whole stream is an answer: one that said why it ended
 * (`finish_reason`) and ended with `data: [DONE]`. The stream is read here:
 * the `openai` client's own reader takes any body that ends quietly for a
 * finished stream (a cut connection, a chunked body that just ends, even an
 * HTML page or a plain JSON completion, which hold no events), and costs more
 * CPU per chunk. To an `http:` engine the request itself is sent on a socket
 * of its own (`http_stream.ts`: `fetch`'s body stream costs more CPU per token
 * than everything else the service does); error answers still become the
 * `openai` client's errors, and an `https:` or proxied engine is sent to
 * through the client. The engine's `usage` is checked against what was sent
 * and received before anyone relies on it (`usage_check.ts`).
 *
 * Beside it: `sse.ts` reads the event stream, `engine_errors.ts` maps what
 * the engine or the connection did wrong to protocol errors.
 *
 * @module
 */

import OpenAI from "openai";
import { abortableSleep, backoffDelay } from "../_util.ts";
import { logger } from "../log.ts";
import type { ToolCall } from "../projects/project_tools.ts";
import type { SamplingParams, Usage } from "../protocol/mod.ts";
import {
  brokenStream,
  incomplete,
  mapError,
  statusError,
  streamedError,
  withErrorObject,
} from "./engine_errors.ts";
import { directlyReachable, HttpStreamClient, type StreamedResponse } from "./http_stream.ts";
import { audioRefusal } from "./audio_content.ts";
import { imageRefusal, type MessageContent } from "./multimodal.ts";
import { sseData } from "./sse.ts";
import { checkUsage } from "./usage_check.ts";

// A request worker sets up logging as the service was told to (`--log-format`), so this
// logger writes there as it does on the gateway's thread.
const log = logger("engine");

/** How to reach the engine. */
export interface EngineEndpoint {
  /** Base URL including `/v1`. */
  readonly baseUrl: string;
  readonly apiKey: string;
  readonly model: string;
}

/** Options of {@linkcode EngineClient}. */
export interface EngineClientOptions {
  /**
   * Milliseconds a whole request may take.
   * @default {120000}
   */
  readonly timeoutMs?: number;
  /**
   * Retries when the engine cannot be reached or answers 5xx before streaming.
   * @default {2}
   */
  readonly retries?: number;
  /**
   * Ask Qwen3-style templates not to think (`chat_template_kwargs.enable_thinking`).
   * @default {false}
   */
  readonly disableThinking?: boolean;
}

/** A chat message as sent to the engine. */
export interface ChatMessage {
  readonly role: "system" | "user" | "assistant";
  /** Text, or (a user turn with images) content parts: text, then `image_url` parts. */
  readonly content: MessageContent;
}

/** What one completion asks of the engine beyond the messages and sampling. */
export interface CompletionOptions {
  /** The served model or LoRA adapter to ask (default: the endpoint's model). */
  readonly model?: string;
  /** OpenAI `response_format` (json_schema: vLLM enforces it with guided decoding). */
  readonly responseFormat?: unknown;
  /** OpenAI tool definitions offered to the model. */
  readonly tools?: readonly unknown[];
  readonly toolChoice?: "auto" | "required" | "none";
}

/** What a finished completion returns. */
export interface Completion {
  readonly text: string;
  /** The tools the model called, in order, if it called any. */
  readonly toolCalls?: readonly ToolCall[];
  readonly finishReason: string;
  readonly usage: Usage | undefined;
}

/** Milliseconds before the first retry; each further one waits about twice as long. */
const RETRY_BASE_MS = 200;

/** Streams chat completions from one OpenAI-compatible engine. */
export class EngineClient {
  readonly #client: OpenAI;
  readonly #model: string;
  readonly #timeoutMs: number;
  readonly #retries: number;
  readonly #disableThinking: boolean;
  /** The completions' own connections, where the engine can be reached without `fetch`. */
  readonly #direct: HttpStreamClient | undefined;
  readonly #completionsUrl: URL;
  readonly #headers: Record<string, string>;
  #usageWarned = false;

  constructor(endpoint: EngineEndpoint, options: EngineClientOptions = {}) {
    this.#client = makeClient(endpoint);
    this.#model = endpoint.model;
    this.#timeoutMs = options.timeoutMs ?? 120_000;
    this.#retries = options.retries ?? 2;
    this.#disableThinking = options.disableThinking ?? false;
    this.#completionsUrl = new URL(`${endpoint.baseUrl.replace(/\/+$/, "")}/chat/completions`);
    this.#direct = directlyReachable(this.#completionsUrl)
      ? new HttpStreamClient(this.#completionsUrl)
      : undefined;
    this.#headers = {
      "content-type": "application/json",
      accept: "application/json",
      authorization: `Bearer ${endpoint.apiKey}`,
    };
  }

  /** Closes the connections kept alive to the engine. */
  close(): void {
    this.#direct?.close();
  }

  /**
   * Runs one chat completion, calling `onText` with each piece of text as it
   * streams in.
   *
   * @throws {ServiceError} `context_overflow`, `engine_unavailable`, `timeout`,
   * `cancelled` (when `signal` aborts with it) or `internal`.
   */
  async complete(
    messages: readonly ChatMessage[],
    params: SamplingParams,
    signal: AbortSignal,
    onText: (text: string) => void,
    options: CompletionOptions = {},
  ): Promise<Completion> {
    const deadline = AbortSignal.timeout(this.#timeoutMs);
    const combined = AbortSignal.any([signal, deadline]);
    for (let attempt = 0;; attempt++) {
      let streamed = false;
      try {
        return await this.#stream(messages, params, combined, (text) => {
          streamed = true;
          onText(text);
        }, options);
      } catch (error) {
        // A text-only model refusing images or audio: the client's error, never retried.
        const mapped = audioRefusal(error, messages) ?? imageRefusal(error, messages) ??
          mapError(error, signal, deadline);
        // A 429 asks for a pause: retrying at once would only add to the load. The caller
        // waits what the engine asked for (`retryAfterMs`) before it tries again.
        const busy = error instanceof OpenAI.APIError && error.status === 429;
        const retriable = mapped.code === "engine_unavailable" && !streamed && !busy &&
          attempt < this.#retries;
        if (!retriable) throw mapped;
        await abortableSleep(backoffDelay(attempt, { firstMs: RETRY_BASE_MS }), combined).catch(
          () => {
            throw mapError(combined.reason, signal, deadline);
          },
        );
      }
    }
  }

  async #stream(
    messages: readonly ChatMessage[],
    params: SamplingParams,
    signal: AbortSignal,
    onText: (text: string) => void,
    options: CompletionOptions,
  ): Promise<Completion> {
    const { top_k, stop, ...standard } = params;
    const body = {
      model: options.model ?? this.#model,
      messages: messages as unknown as OpenAI.Chat.Completions.ChatCompletionMessageParam[],
      stream: true as const,
      stream_options: { include_usage: true },
      ...standard,
      ...(stop && { stop: [...stop] }),
      // vLLM extensions, ignored by engines that do not know them.
      ...(top_k !== undefined && { top_k }),
      ...(this.#disableThinking && { chat_template_kwargs: { enable_thinking: false } }),
      ...(options.responseFormat !== undefined && {
        response_format: options.responseFormat as OpenAI.ResponseFormatJSONSchema,
      }),
      ...(options.tools !== undefined && {
        tools: options.tools as OpenAI.Chat.Completions.ChatCompletionTool[],
        ...(options.toolChoice !== undefined && { tool_choice: options.toolChoice }),
      }),
    };
    const response = await this.#post(body, signal);
    let text = "";
    let reasoning = "";
    let finishReason: string | undefined;
    let usage: Usage | undefined;
    let whole = false;
    // Tool calls stream in pieces: the first names the call, the rest add to its arguments.
    const calls: { id?: string; name: string; arguments: string }[] = [];
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") {
        whole = true;
        break;
      }
      const chunk = parseChunk(data);
      if (chunk.usage) {
        const { prompt_tokens, completion_tokens, total_tokens } = chunk.usage;
        usage = { prompt_tokens, completion_tokens, total_tokens };
      }
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      const piece = choice.delta?.content;
      if (piece) {
        text += piece;
        onText(piece);
      }
      // Reasoning a reasoning parser split off counts in completion_tokens too.
      const thought = reasoningOf(choice.delta);
      if (thought) reasoning += thought;
      for (const piece of choice.delta?.tool_calls ?? []) {
        const call = calls[piece.index ?? Math.max(0, calls.length - 1)] ??= {
          name: "",
          arguments: "",
        };
        if (piece.id) call.id = piece.id;
        if (piece.function?.name) call.name += piece.function.name;
        if (piece.function?.arguments) call.arguments += piece.function.arguments;
      }
      if (choice.finish_reason) finishReason = choice.finish_reason;
    }
    // An aborted stream may end quietly instead of throwing: never report it as finished.
    signal.throwIfAborted();
    if (!whole) throw incomplete(response);
    if (finishReason === undefined) {
      throw brokenStream(
        "the engine's stream ended without saying why (no finish_reason): the answer is incomplete",
      );
    }
    const toolCalls = calls.filter((call) => call !== undefined && call.name !== "");
    const generated = text + reasoning + toolCalls.map((c) => c.name + c.arguments).join("");
    // Tool definitions and a schema are part of the prompt the engine counts.
    const offered = options.tools === undefined && options.responseFormat === undefined
      ? ""
      : JSON.stringify([options.tools, options.responseFormat]);
    if (usage) usage = await this.#checkUsage(usage, messages, params, generated, offered);
    return {
      text,
      finishReason,
      usage,
      ...(toolCalls.length > 0 && { toolCalls }),
    };
  }

  /**
   * Sends a streamed completion; resolves with a 2xx answer whose body is
   * unread, or throws the `openai` client's error for any other. The hot path
   * bypasses `fetch` (and the client's request building) where it can.
   */
  async #post(
    body: OpenAI.Chat.ChatCompletionCreateParamsStreaming,
    signal: AbortSignal,
  ): Promise<StreamedResponse | Response> {
    if (!this.#direct) {
      return await this.#client.chat.completions.create(body, { signal, maxRetries: 0 })
        .asResponse();
    }
    const { pathname, search } = this.#completionsUrl;
    let response: StreamedResponse;
    try {
      response = await this.#direct.post(
        pathname + search,
        this.#headers,
        JSON.stringify(body),
        signal,
      );
    } catch (error) {
      if (signal.aborted) throw error;
      throw new OpenAI.APIConnectionError({ cause: error as Error });
    }
    if (response.status >= 200 && response.status < 300) return response;
    throw await statusError(response);
  }

  /** `usage` checked (see {@linkcode checkUsage}); figures out of bounds are logged, once. */
  async #checkUsage(
    usage: Usage,
    messages: readonly ChatMessage[],
    params: SamplingParams,
    generated: string,
    offered: string,
  ): Promise<Usage> {
    const checked = await checkUsage(usage, messages, params, generated, offered);
    if (checked.wrong.length > 0 && !this.#usageWarned) {
      this.#usageWarned = true;
      log.warn(
        "Usage out of bounds: {wrong}; estimates are used instead (logged once per worker)",
        { wrong: checked.wrong.join(", ") },
      );
    }
    return checked.usage;
  }
}

/** Reasoning text of a delta, under the names vLLM's reasoning parsers have used. */
function reasoningOf(delta: unknown): string | undefined {
  const fields = delta as { reasoning_content?: unknown; reasoning?: unknown } | undefined;
  const text = fields?.reasoning_content ?? fields?.reasoning;
  return typeof text === "string" ? text : undefined;
}

function makeClient(endpoint: EngineEndpoint): OpenAI {
  return new OpenAI({
    baseURL: endpoint.baseUrl,
    apiKey: endpoint.apiKey,
    maxRetries: 0,
    fetch: async (input: string | URL | Request, init?: RequestInit) => {
      const response = await fetch(input, init);
      return response.ok ? response : await withErrorObject(response);
    },
  });
}

type Chunk = OpenAI.Chat.Completions.ChatCompletionChunk;

/** One event of the stream as a chunk; malformed JSON and error events fail the stream. */
function parseChunk(data: string): Chunk {
  let chunk: Chunk & { error?: { message?: unknown } | string; message?: unknown };
  try {
    chunk = JSON.parse(data);
  } catch {
    throw brokenStream("the engine's stream holds malformed JSON");
  }
  if (typeof chunk !== "object" || chunk === null) {
    throw brokenStream("the engine's stream holds no chunk");
  }
  // vLLM reports a failure after the stream began as an event: `{"error": {...}}`, or the
  // error itself (`{"object": "error", "message": ...}`) before 0.10.1.
  const error = chunk.error ?? ((chunk.object as string) === "error" ? chunk : undefined);
  if (error) throw streamedError(error);
  return chunk;
}
