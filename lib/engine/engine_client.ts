/**
 * The one place that talks to the engine: a streaming chat completion through
 * the `openai` client, with engine failures mapped to protocol error codes.
 *
 * @module
 */

import OpenAI from "openai";
import { abortableSleep } from "../_util.ts";
import { ServiceError } from "../protocol/errors.ts";
import type { SamplingParams, Usage } from "../protocol/mod.ts";

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
  readonly content: string;
}

/** What a finished completion returns. */
export interface Completion {
  readonly text: string;
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

  constructor(endpoint: EngineEndpoint, options: EngineClientOptions = {}) {
    this.#client = makeClient(endpoint);
    this.#model = endpoint.model;
    this.#timeoutMs = options.timeoutMs ?? 120_000;
    this.#retries = options.retries ?? 2;
    this.#disableThinking = options.disableThinking ?? false;
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
  ): Promise<Completion> {
    const deadline = AbortSignal.timeout(this.#timeoutMs);
    const combined = AbortSignal.any([signal, deadline]);
    for (let attempt = 0;; attempt++) {
      let streamed = false;
      try {
        return await this.#stream(messages, params, combined, (text) => {
          streamed = true;
          onText(text);
        });
      } catch (error) {
        const mapped = mapError(error, signal, deadline);
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
  ): Promise<Completion> {
    const { top_k, stop, ...standard } = params;
    const body = {
      model: this.#model,
      messages: messages as ChatMessage[],
      stream: true as const,
      stream_options: { include_usage: true },
      ...standard,
      ...(stop && { stop: [...stop] }),
      // vLLM extensions, ignored by engines that do not know them.
      ...(top_k !== undefined && { top_k }),
      ...(this.#disableThinking && { chat_template_kwargs: { enable_thinking: false } }),
    };
    const stream = await this.#client.chat.completions.create(body, { signal, maxRetries: 0 });
    let text = "";
    let finishReason = "stop";
    let usage: Usage | undefined;
    let firstTokenAt: number | undefined;
    for await (const chunk of stream) {
      if (chunk.usage) {
        const { prompt_tokens, completion_tokens, total_tokens } = chunk.usage;
        usage = { prompt_tokens, completion_tokens, total_tokens };
      }
      const choice = chunk.choices[0];
      if (!choice) continue;
      const piece = choice.delta?.content;
      if (piece) {
        firstTokenAt ??= performance.now();
        text += piece;
        onText(piece);
      }
      if (choice.finish_reason) finishReason = choice.finish_reason;
    }
    // An aborted stream may end quietly instead of throwing: never report it as finished.
    signal.throwIfAborted();
    return { text, finishReason, usage, firstTokenAt };
  }
}

function makeClient(endpoint: EngineEndpoint): OpenAI {
  return new OpenAI({ baseURL: endpoint.baseUrl, apiKey: endpoint.apiKey, maxRetries: 0 });
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
    const message = error.message ?? "";
    if (error.status === 400 && CONTEXT_OVERFLOW.test(message)) {
      return new ServiceError("context_overflow", message, { cause: error });
    }
    if (error.status >= 500 || error.status === 429) {
      return new ServiceError("engine_unavailable", `engine answered ${error.status}`, {
        cause: error,
        retryAfterMs: 1000,
      });
    }
    return new ServiceError("internal", `engine refused the request: ${message}`, { cause: error });
  }
  if (error instanceof OpenAI.APIConnectionError || error instanceof TypeError) {
    return new ServiceError("engine_unavailable", "the engine cannot be reached", {
      cause: error,
      retryAfterMs: 1000,
    });
  }
  // A stream cut in the middle surfaces as a plain Error from the SSE reader.
  return new ServiceError(
    "engine_unavailable",
    `engine stream failed: ${(error as Error)?.message}`,
    {
      cause: error,
      retryAfterMs: 1000,
    },
  );
}
