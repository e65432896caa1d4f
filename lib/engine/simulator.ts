/**
 * A simulated OpenAI-compatible engine that behaves like vLLM, for client
 * developers without a GPU and for tests: `/health`, `/v1/models`,
 * `/v1/chat/completions` (streaming or not, with usage), `/tokenize`,
 * `/metrics`, vLLM's context-length error, and latency that grows with the
 * number of requests it is running.
 *
 * Replies are deterministic and depend on the conversation received (see
 * `simulated_reply.ts`: what is said, structured output, tool calls). Images
 * in a user turn count in `usage.prompt_tokens` roughly as vLLM counts
 * Qwen2.5-VL's (a token per 28×28 pixels, plus 2; `imageTokens` in
 * `protocol/images.ts`). A `model` other than the served one must be one of
 * `adapters` (vLLM's `--lora-modules`); another name is answered 404 as vLLM
 * answers it.
 *
 * @module
 */

import { abortableSleep } from "../_util.ts";
import { audioTokensOf, undecodableAudio } from "./audio_content.ts";
import { imageTokensOf } from "./multimodal.ts";
import { PrefixCache } from "./prefix_cache.ts";
import { refusalOf } from "./vllm_refusals.ts";
import {
  type ChatBody,
  completionObject,
  promptTokenIds,
  simulatedReply,
  tokenIds,
} from "./simulated_reply.ts";

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
   * `always`: every answer starts with reasoning ended by `</think>`, with no
   * opening tag (like QwQ, whose chat template opens the block in the prompt);
   * `template`: a `<think>...</think>` block unless
   * `chat_template_kwargs.enable_thinking` is false (like Qwen3);
   * `never`: no reasoning.
   * @default {"never"}
   */
  readonly thinking?: SimulatedThinking;
  /**
   * vLLM's `--reasoning-parser`: when set, the reasoning goes out as
   * `reasoning_content` (v0.11.0's name) and only the answer as `content`,
   * as vLLM's `deepseek_r1` and `qwen3` parsers split them; unset, the
   * reasoning is part of `content`.
   */
  readonly reasoningParser?: string;
  /**
   * vLLM's `--tool-call-parser` (with `--enable-auto-tool-choice`): unset,
   * a request with tools and `tool_choice` `auto` (the default) or
   * `required` is refused with vLLM's 400; set, the model may call them.
   */
  readonly toolParser?: string;
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
   * Prefill one prompt at a time, as a GPU does (decode is batched): a request's first token
   * waits for the prefills ahead of it, `wait + ttftMs + prefillMsPerToken * uncached`, and
   * `/metrics` counts the requests waiting for theirs in `vllm:num_requests_waiting` (a request
   * cancelled while it waits still takes its turn, where vLLM would drop it). Off, prefills
   * overlap and nothing waits.
   * @default {false}
   */
  readonly prefillQueue?: boolean;
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
  /**
   * How good the answers of each model or adapter are, 0 to 1 (`--sim-quality`):
   * when set, every answer is signed with its model, a hash of its system
   * prompt and an outcome drawn with that probability (see `simulated_reply.ts`);
   * a model not named here is good half of the time.
   * @default {undefined}
   */
  readonly quality?: Readonly<Record<string, number>>;
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
  // The serialized prefill: when the GPU is free for the next prompt, and the start times of the
  // prefills not begun yet (vLLM's waiting requests), with the prompt tokens of those running.
  let prefillFreeAt = 0;
  const prefillStarts = new Set<{ readonly start: number }>();
  let runningPromptTokens = 0;
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
    const refusal = refusalOf(body, { toolParser: options.toolParser });
    if (refusal) return error(refusal.status, refusal.message);
    // Decoded once the request is taken (its base64 first: an unpadded clip is refused above).
    const unheard = undecodableAudio(body.messages);
    if (unheard) return error(400, unheard);

    const prompt = promptTokenIds(
      body.messages,
      body.tools || body.response_format ? JSON.stringify([body.tools, body.response_format]) : "",
    );
    // Images count roughly as vLLM counts Qwen2.5-VL's (`imageTokens`): a token per 28×28 pixels;
    // audio as Qwen2-Audio's, 25 tokens a second.
    const mediaTokens = body.messages.reduce(
      (sum, m) => sum + imageTokensOf(m.content) + audioTokensOf(m.content),
      0,
    );
    const promptTokens = prompt.length + mediaTokens;
    const maxTokens = body.max_completion_tokens ?? body.max_tokens ?? maxModelLen - promptTokens;
    if (maxTokens > maxModelLen) {
      // vLLM's check of max_tokens alone, before the prompt's length is known.
      return error(
        400,
        `max_tokens=${maxTokens} cannot be greater than max_model_len=${maxModelLen}. ` +
          "Please request fewer output tokens.",
      );
    }
    // vLLM counts a prompt's image (and audio) tokens only once the engine has processed them,
    // after the 200 of a stream: that overflow comes inside the stream (v0.11.0's processor words it).
    const textTokens = prompt.length;
    const lateOverflow = mediaTokens > 0 && textTokens + maxTokens <= maxModelLen &&
      promptTokens > maxModelLen;
    if (lateOverflow && body.stream) {
      return streamedError(
        `The decoder prompt (length ${promptTokens}) is longer than the maximum model length ` +
          `of ${maxModelLen}. Make sure that \`max_model_len\` is no smaller than the number ` +
          "of text tokens plus multimodal tokens. For image inputs, the number of image tokens " +
          "depends on the number of images, and possibly their aspect ratios as well.",
      );
    }
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
    const reply = simulatedReply(body, {
      adapter,
      fillerTokens: options.fillerTokens ?? 0,
      thinking: thinks ? (options.thinking === "always" ? "opened" : "tagged") : undefined,
      splitReasoning: options.reasoningParser !== undefined,
      maxTokens,
      ...(options.quality && {
        graded: { model: adapter ?? model, quality: options.quality[adapter ?? model] ?? 0.5 },
      }),
    });
    const { tokens, reasoning, calls, finishReason, completionTokens } = reply;
    const usage = {
      prompt_tokens: promptTokens,
      completion_tokens: completionTokens,
      total_tokens: promptTokens + completionTokens,
    };
    const id = `chatcmpl-sim-${++requestsTotal}`;
    const created = Math.floor(Date.now() / 1000);
    const prefillMs = prefillMsPerToken * (promptTokens - prefixCache.lookup(prompt));
    let firstTokenMs = ttftMs + prefillMs;
    const now = performance.now();
    const queued = { start: Math.max(now, prefillFreeAt) };
    if (options.prefillQueue) {
      prefillFreeAt = queued.start + prefillMs;
      firstTokenMs += queued.start - now;
      prefillStarts.add(queued);
    }
    running++;
    runningPromptTokens += promptTokens;
    const ended = () => {
      running--;
      runningPromptTokens -= promptTokens;
      prefillStarts.delete(queued);
    };
    promptTokensTotal += promptTokens;
    generationTokensTotal += reasoning.length + tokens.length;

    if (!body.stream) {
      try {
        await abortableSleep(
          firstTokenMs + tokenGap() * Math.max(0, reasoning.length + tokens.length - 1),
        );
      } finally {
        ended();
      }
      return Response.json(completionObject({ id, created, model }, reply, usage));
    }

    const event = (fields: Record<string, unknown>) =>
      ENCODER.encode(
        `data: ${
          JSON.stringify({ id, object: "chat.completion.chunk", created, model, ...fields })
        }\n\n`,
      );
    const chunk = (delta: Record<string, unknown>, finish: string | null) =>
      event({ choices: [{ index: 0, delta, finish_reason: finish }] });
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
          // Split reasoning streams first, as `reasoning_content` (v0.11.0's field).
          const pieces = [
            ...reasoning.map((text) => ({ reasoning_content: text })),
            ...tokens.map((text) => ({ content: text })),
          ];
          for (let i = 0; i < pieces.length; i++) {
            if (fault === "drop" && i === 2) throw new Error("connection dropped");
            const gap = tokenGap();
            if (i > 0 && gap > 0) await abortableSleep(gap, signal);
            controller.enqueue(chunk(pieces[i], null));
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
          if (includeUsage) controller.enqueue(event({ choices: [], usage }));
          controller.enqueue(ENCODER.encode("data: [DONE]\n\n"));
          controller.close();
        } catch (cause) {
          // Cancelled by the client, or a dropped connection to show.
          if (!signal.aborted) controller.error(cause);
        } finally {
          ended();
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
      ? tokenIds(body.messages.map((m) => String(m.content)).join("\n"))
      : tokenIds(String(body.prompt ?? ""));
    return Response.json({ count: tokens.length, max_model_len: maxModelLen, tokens });
  }

  const metrics = () => {
    const now = performance.now();
    let waiting = 0;
    for (const { start } of prefillStarts) if (start > now) waiting++;
    const blocks = options.prefixCacheBlocks ?? 65536;
    return new Response(
      [
        `vllm:num_requests_running{model_name="${model}"} ${running - waiting}`,
        `vllm:num_requests_waiting{model_name="${model}"} ${waiting}`,
        `vllm:kv_cache_usage_perc{model_name="${model}"} ${
          Math.min(1, runningPromptTokens / 16 / blocks)
        }`,
        `vllm:cache_config_info{block_size="16",num_gpu_blocks="${blocks}"} 1`,
        `vllm:request_success_total{model_name="${model}"} ${requestsTotal}`,
        `vllm:prompt_tokens_total{model_name="${model}"} ${promptTokensTotal}`,
        `vllm:generation_tokens_total{model_name="${model}"} ${generationTokensTotal}`,
        `vllm:prefix_cache_queries_total{model_name="${model}"} ${prefixCache.queries}`,
        `vllm:prefix_cache_hits_total{model_name="${model}"} ${prefixCache.hits}`,
        "",
      ].join("\n"),
      { headers: { "content-type": "text/plain; version=0.0.4" } },
    );
  };

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

/**
 * A 200 stream that carries only vLLM's error event and `[DONE]`, as vLLM
 * reports what fails once a stream has begun
 * (vllm/entrypoints/openai/serving_chat.py, `create_streaming_error_response`).
 */
function streamedError(message: string): Response {
  const event = JSON.stringify({
    error: { message, type: "BadRequestError", param: null, code: 400 },
  });
  return new Response(`data: ${event}\n\ndata: [DONE]\n\n`, {
    headers: { "content-type": "text/event-stream", "cache-control": "no-cache" },
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

if (import.meta.main) {
  const port = Number(Deno.args[0] ?? 8000);
  const sim = await startSimulator({ port });
  console.log(`simulated engine on ${sim.url}`);
}
