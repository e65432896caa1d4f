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
 * and received before anyone relies on it.
 *
 * @module
 */

import OpenAI from "openai";
import { abortableSleep } from "../_util.ts";
import { directlyReachable, HttpStreamClient, type StreamedResponse } from "./http_stream.ts";
import {
  imageRefusal,
  imageTokenBoundOf,
  imageTokensOf,
  type MessageContent,
  textOf,
} from "./multimodal.ts";
import { ServiceError } from "../protocol/errors.ts";
import type { SamplingParams, Usage } from "../protocol/mod.ts";
import { estimateMessageTokens, MESSAGE_OVERHEAD_TOKENS, messageTokenBound } from "../tokens.ts";

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
  /**
   * Where warnings go (request workers have no logger of their own).
   * @default {console.warn}
   */
  readonly warn?: (message: string) => void;
}

/** A chat message as sent to the engine. */
export interface ChatMessage {
  readonly role: "system" | "user" | "assistant";
  /** Text, or (a user turn with images) content parts: text, then `image_url` parts. */
  readonly content: MessageContent;
}

/** A tool call of a completion: the function's name and its arguments, as JSON text. */
export interface ToolCall {
  readonly id?: string;
  readonly name: string;
  readonly arguments: string;
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
  /** When the first token arrived (performance.now()), if any did. */
  readonly firstTokenAt: number | undefined;
}

const RETRY_BASE_MS = 200;

/** Streams chat completions from one OpenAI-compatible engine. */
export class EngineClient {
  readonly #client: OpenAI;
  readonly #model: string;
  readonly #timeoutMs: number;
  readonly #retries: number;
  readonly #disableThinking: boolean;
  readonly #warn: (message: string) => void;
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
    this.#warn = options.warn ?? ((message) => console.warn(message));
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
        // A text-only model refusing images: the client's error, never retried.
        const mapped = imageRefusal(error, messages) ?? mapError(error, signal, deadline);
        const retriable = mapped.code === "engine_unavailable" && !streamed &&
          attempt < this.#retries;
        if (!retriable) throw mapped;
        await abortableSleep(RETRY_BASE_MS * 2 ** attempt * (0.5 + Math.random()), combined).catch(
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
    let firstTokenAt: number | undefined;
    let whole = false;
    // Tool calls stream in pieces: the first names the call, the rest add to its arguments.
    const calls: { id?: string; name: string; arguments: string }[] = [];
    for await (const data of sseData(response)) {
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
        firstTokenAt ??= performance.now();
        text += piece;
        onText(piece);
      }
      // Reasoning a reasoning parser split off counts in completion_tokens too.
      const thought = reasoningOf(choice.delta);
      if (thought) reasoning += thought;
      for (const piece of choice.delta?.tool_calls ?? []) {
        firstTokenAt ??= performance.now();
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
      throw new ServiceError(
        "engine_unavailable",
        "the engine's stream ended without saying why (no finish_reason): the answer is incomplete",
        { retryAfterMs: 1000 },
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
      firstTokenAt,
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

  /**
   * `usage` as reported when it is possible for what was sent and received;
   * figures out of bounds are replaced by estimates (and logged, once).
   */
  async #checkUsage(
    usage: Usage,
    messages: readonly ChatMessage[],
    params: SamplingParams,
    generated: string,
    offered = "",
  ): Promise<Usage> {
    const bounds = usageBounds(messages, params, generated, offered);
    const within = (value: number, [low, high]: readonly [number, number]) =>
      Number.isSafeInteger(value) && value >= low && value <= high;
    let { prompt_tokens, completion_tokens } = usage;
    const wrong: string[] = [];
    if (!within(prompt_tokens, bounds.prompt)) {
      wrong.push(`prompt_tokens ${prompt_tokens} (possible: ${bounds.prompt.join("..")})`);
      prompt_tokens = 0;
      for (const { content } of messages) {
        prompt_tokens += await estimateMessageTokens(textOf(content)) + imageTokensOf(content);
      }
    }
    if (!within(completion_tokens, bounds.completion)) {
      wrong.push(
        `completion_tokens ${completion_tokens} (possible: ${bounds.completion.join("..")})`,
      );
      const estimate = await estimateMessageTokens(generated) - MESSAGE_OVERHEAD_TOKENS;
      completion_tokens = Math.min(bounds.completion[1], Math.max(bounds.completion[0], estimate));
    }
    if (wrong.length === 0) {
      return usage.total_tokens === prompt_tokens + completion_tokens
        ? usage
        : { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens };
    }
    if (!this.#usageWarned) {
      this.#usageWarned = true;
      this.#warn(
        `vllm-mqtt engine: usage out of bounds: ${wrong.join(", ")}; ` +
          "estimates are used instead (logged once per worker)",
      );
    }
    return { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens };
  }
}

/** Tokens a chat template may add beyond its per-message markers (a default date line, BOS). */
const TEMPLATE_SLACK_TOKENS = 256;
/** Tokens a template's markers of one message may take beyond `MESSAGE_OVERHEAD_TOKENS`. */
const EXTRA_MARKER_TOKENS = 4;
/** Tokens a completion may hold that never show as text (EOS, reasoning markers). */
const HIDDEN_COMPLETION_TOKENS = 16;

/**
 * The range of `usage` figures possible for a completion of `messages` that
 * generated `generated` (answer and reasoning): a prompt holds at most a token
 * per UTF-8 byte plus template markers; a completion at most `max_tokens`, and
 * at most a token per byte generated plus a stop string and hidden tokens.
 */
function usageBounds(
  messages: readonly ChatMessage[],
  params: Pick<SamplingParams, "max_tokens" | "stop">,
  generated: string,
  offered = "",
): { prompt: readonly [number, number]; completion: readonly [number, number] } {
  let prompt = TEMPLATE_SLACK_TOKENS + (offered === "" ? 0 : messageTokenBound(offered));
  for (const { content } of messages) {
    // An image counts for as many tokens as the model makes of it: bounded by its size.
    prompt += messageTokenBound(textOf(content)) + imageTokenBoundOf(content) +
      EXTRA_MARKER_TOKENS;
  }
  let stop = 0;
  for (const string of params.stop ?? []) stop = Math.max(stop, messageTokenBound(string));
  const fromText = messageTokenBound(generated) + stop + HIDDEN_COMPLETION_TOKENS;
  return {
    prompt: [1, prompt],
    completion: [generated === "" ? 0 : 1, Math.min(params.max_tokens, fromText)],
  };
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

/**
 * The `data` of each server-sent event in `response`'s body (lines end in
 * `\n` or `\r\n`; other fields and comments are skipped). Breaking off
 * cancels the body.
 */
async function* sseData(
  response: { readonly body: AsyncIterable<Uint8Array> | null },
): AsyncGenerator<string> {
  if (response.body === null) return;
  const decoder = new TextDecoder();
  let buffer = "";
  let data: string[] = [];
  const field = (line: string) => {
    if (line.endsWith("\r")) line = line.slice(0, -1);
    if (line.startsWith("data:")) data.push(line.slice(line.charCodeAt(5) === 0x20 ? 6 : 5));
  };
  for await (const bytes of response.body) {
    buffer += decoder.decode(bytes, { stream: true });
    let start = 0;
    for (let end; (end = buffer.indexOf("\n", start)) !== -1; start = end + 1) {
      const blank = end === start || (end === start + 1 && buffer.charCodeAt(start) === 0x0d);
      if (!blank) {
        field(buffer.slice(start, end));
      } else if (data.length > 0) {
        yield data.join("\n");
        data = [];
      }
    }
    buffer = buffer.slice(start);
  }
  // A last event may lack its blank line.
  field(buffer + decoder.decode());
  if (data.length > 0) yield data.join("\n");
}

type Chunk = OpenAI.Chat.Completions.ChatCompletionChunk;

/** One event of the stream as a chunk; malformed JSON and error events fail the stream. */
function parseChunk(data: string): Chunk {
  let chunk: Chunk & { error?: { message?: unknown } | string; message?: unknown };
  try {
    chunk = JSON.parse(data);
  } catch {
    throw new ServiceError("engine_unavailable", "the engine's stream holds malformed JSON", {
      retryAfterMs: 1000,
    });
  }
  if (typeof chunk !== "object" || chunk === null) {
    throw new ServiceError("engine_unavailable", "the engine's stream holds no chunk", {
      retryAfterMs: 1000,
    });
  }
  // vLLM reports a failure after the stream began as an event: `{"error": {...}}`, or the
  // error itself (`{"object": "error", "message": ...}`) before 0.10.1.
  const error = chunk.error ?? ((chunk.object as string) === "error" ? chunk : undefined);
  if (error) {
    const detail = clientSafe(String(typeof error === "string" ? error : error.message));
    throw new ServiceError(
      "engine_unavailable",
      detail === undefined ? "engine stream failed" : `engine stream failed: ${detail}`,
      { retryAfterMs: 1000 },
    );
  }
  return chunk;
}

/** The error of a 2xx answer that ended without `data: [DONE]`. */
function incomplete(response: { status: number; headers: Headers }): ServiceError {
  // Named to a client: a media type's characters only.
  const type = (response.headers.get("content-type") ?? "").split(";")[0]
    .replace(/[^\w.+/-]/g, "").slice(0, 60) || "no content-type";
  return new ServiceError(
    "engine_unavailable",
    type === "text/event-stream"
      ? "the engine's stream ended before [DONE]: the answer is incomplete"
      : `the engine answered ${response.status} with ${type}, not an event stream`,
    { retryAfterMs: 1000 },
  );
}

/** The `openai` client's error for a non-2xx answer read directly, made as it makes them. */
async function statusError(
  response: StreamedResponse,
): Promise<InstanceType<typeof OpenAI.APIError>> {
  const pieces: Uint8Array[] = [];
  try {
    for await (const bytes of response.body) pieces.push(bytes);
  } catch { /* what came is the body */ }
  const nullBody = [204, 205, 304].includes(response.status);
  const answer = await withErrorObject(
    new Response(nullBody ? null : new Blob(pieces as BlobPart[]), {
      status: response.status,
      headers: response.headers,
    }),
  );
  const text = await answer.text();
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch { /* a message in plain text */ }
  const error = json && typeof json === "object" && (json as { error?: unknown }).error == null
    ? { error: json }
    : json;
  return OpenAI.APIError.generate(
    response.status,
    error as object | undefined,
    json ? undefined : text,
    answer.headers,
  );
}

/**
 * An error answer whose JSON carries its message at the top level (vLLM
 * before 0.10.1: `{"object": "error", "message": ...}`; `{"detail": ...}`
 * elsewhere) rewritten in OpenAI's shape, `{"error": {"message": ...}}`, the
 * only one the `openai` client reads a message from.
 */
async function withErrorObject(response: Response): Promise<Response> {
  if (!/json/i.test(response.headers.get("content-type") ?? "")) return response;
  const text = await response.text();
  let body = text;
  try {
    const parsed = JSON.parse(text);
    const message = parsed?.message ?? parsed?.detail;
    if (parsed?.error === undefined && typeof message === "string") {
      body = JSON.stringify({ error: { ...parsed, message } });
    }
  } catch { /* not JSON after all: left as it is */ }
  const headers = new Headers(response.headers);
  headers.delete("content-length");
  return new Response(body, { status: response.status, statusText: response.statusText, headers });
}

const CONTEXT_OVERFLOW = /maximum context length|context length|too many tokens|input is too long/i;

/** Maps whatever the client threw to a protocol error. */
function mapError(error: unknown, signal: AbortSignal, deadline: AbortSignal): ServiceError {
  if (error instanceof ServiceError) return error;
  if (signal.aborted) {
    return signal.reason instanceof ServiceError
      ? signal.reason
      : new ServiceError("cancelled", "request was cancelled");
  }
  if (deadline.aborted) {
    return new ServiceError("timeout", "the engine did not finish in time");
  }
  if (error instanceof OpenAI.APIError && error.status !== undefined) {
    const { status } = error;
    const described = describeRefusal(error);
    if (status === 400 && CONTEXT_OVERFLOW.test(error.message ?? "")) {
      return new ServiceError("context_overflow", described, { cause: error });
    }
    if (status >= 500 || status === 429) {
      return new ServiceError("engine_unavailable", `engine answered ${described}`, {
        cause: error,
        retryAfterMs: 1000,
      });
    }
    return new ServiceError("internal", `engine refused the request: ${described}`, {
      cause: error,
    });
  }
  if (error instanceof OpenAI.APIConnectionError || error instanceof TypeError) {
    return new ServiceError("engine_unavailable", "the engine cannot be reached", {
      cause: error,
      retryAfterMs: 1000,
    });
  }
  // Anything else thrown while the stream was read.
  const detail = clientSafe(String((error as Error)?.message ?? error));
  return new ServiceError(
    "engine_unavailable",
    detail === undefined ? "engine stream failed" : `engine stream failed: ${detail}`,
    { cause: error, retryAfterMs: 1000 },
  );
}

/** Reason phrases of the statuses an engine or a proxy in front of it may answer. */
const REASONS: Record<number, string> = {
  400: "Bad Request",
  401: "Unauthorized",
  403: "Forbidden",
  404: "Not Found",
  405: "Method Not Allowed",
  408: "Request Timeout",
  409: "Conflict",
  413: "Content Too Large",
  415: "Unsupported Media Type",
  422: "Unprocessable Content",
  429: "Too Many Requests",
  500: "Internal Server Error",
  501: "Not Implemented",
  502: "Bad Gateway",
  503: "Service Unavailable",
  504: "Gateway Timeout",
};

/** Characters of an engine's error message passed on to a client. */
const MAX_DETAIL_CHARS = 400;

/**
 * An engine's error answer in short, for a client: the status and the message
 * of a JSON error (vLLM's say what was wrong, e.g. the context length), or
 * else a short plain-text body; never an HTML page, which becomes the status's
 * reason phrase.
 */
function describeRefusal(error: InstanceType<typeof OpenAI.APIError>): string {
  const status = error.status!;
  // `{"error": {"message": ...}}` (OpenAI, vLLM) or `{"error": "..."}` (some other servers).
  const fromJson = typeof error.error === "string"
    ? error.error
    : (error.error as { message?: unknown } | undefined)?.message;
  // Without a JSON error, the client's message is "<status> <body text>".
  const fromText = error.error === undefined
    ? error.message.replace(/^\d{3} /, "").replace(/^status code \(no body\)$/, "")
    : "";
  const detail = clientSafe(typeof fromJson === "string" ? fromJson : fromText);
  return detail === undefined
    ? `${status} ${REASONS[status] ?? "(no reason given)"}`
    : `${status}: ${detail}`;
}

/**
 * `text` from the engine made fit for a client: on one line, at most
 * {@linkcode MAX_DETAIL_CHARS} long; undefined when empty or markup.
 */
function clientSafe(text: string): string | undefined {
  const line = text.replace(/\p{Cc}+/gu, " ").replace(/\s+/g, " ").trim();
  if (line === "" || /<[a-z!/?][^>]*>/i.test(line)) return undefined;
  return line.length > MAX_DETAIL_CHARS ? `${line.slice(0, MAX_DETAIL_CHARS)}…` : line;
}
