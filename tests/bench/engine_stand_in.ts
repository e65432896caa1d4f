/**
 * A zero-latency OpenAI-compatible engine stand-in for the CPU benchmarks
 * (a Web Worker: post it {@linkcode StandInOptions}, it answers with its URL).
 * Every answer is the same text: in one chunk, or in `chunks` chunks of
 * `chunkText` each (one SSE event each), then the finish chunk, `usage` when
 * asked, and `data: [DONE]`. The chunks go back to back (`gapMs` 0: all
 * enqueued at once, so that a reader gets many in one read), or one every
 * `gapMs` milliseconds, each its own chunked frame, as an engine sends tokens
 * while it generates them. It does as little work per request as it can
 * (events are encoded once), so that the machine's cores go to what is
 * measured. Its `/metrics` is about as long as vLLM's (histograms with their
 * buckets make most of it, 40 KB), so that reading it every few seconds, as the
 * service does with several engines, costs what it costs against vLLM.
 *
 * @module
 */

/// <reference lib="deno.worker" />

/** What the stand-in answers. */
export interface StandInOptions {
  /** Content chunks per answer. */
  readonly chunks: number;
  /** The text of each chunk. */
  readonly chunkText: string;
  /** Milliseconds between content chunks; 0 sends them all at once. */
  readonly gapMs: number;
}

const encoder = new TextEncoder();

/**
 * A `/metrics` text of vLLM's length: the gauges and counters the service reads, and histograms
 * (time to first token, between tokens, end to end, queue, prefill, decode, tokens...) with
 * vLLM's label set and buckets.
 */
function metricsText(): string {
  const labels = 'engine="0",model_name="bench-model"';
  const lines = [
    `vllm:num_requests_running{${labels}} 0.0`,
    `vllm:num_requests_waiting{${labels}} 0.0`,
    `vllm:kv_cache_usage_perc{${labels}} 0.0`,
    `vllm:prefix_cache_queries_total{${labels}} 0.0`,
    `vllm:prefix_cache_hits_total{${labels}} 0.0`,
    'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="65536"} 1.0',
  ];
  const histograms = [
    "time_to_first_token_seconds",
    "inter_token_latency_seconds",
    "e2e_request_latency_seconds",
    "request_queue_time_seconds",
    "request_inference_time_seconds",
    "request_prefill_time_seconds",
    "request_decode_time_seconds",
    "request_prompt_tokens",
    "request_generation_tokens",
    "request_max_num_generation_tokens",
    "request_params_max_tokens",
    "iteration_tokens_total",
    "request_time_per_output_token_seconds",
  ];
  for (const name of histograms) {
    lines.push(`# HELP vllm:${name} Histogram of ${name}.`, `# TYPE vllm:${name} histogram`);
    for (let bucket = 0; bucket < 30; bucket++) {
      lines.push(`vllm:${name}_bucket{${labels},le="${2 ** (bucket - 10)}"} 0.0`);
    }
    lines.push(`vllm:${name}_bucket{${labels},le="+Inf"} 0.0`);
    lines.push(`vllm:${name}_count{${labels}} 0.0`, `vllm:${name}_sum{${labels}} 0.0`);
  }
  return lines.join("\n") + "\n";
}
const event = (payload: unknown) => encoder.encode(`data: ${JSON.stringify(payload)}\n\n`);

function serve({ chunks, chunkText, gapMs }: StandInOptions): string {
  const created = Math.floor(Date.now() / 1000);
  const chunk = (delta: Record<string, unknown>, finish: string | null) =>
    event({
      id: "chatcmpl-bench",
      object: "chat.completion.chunk",
      created,
      model: "bench-model",
      choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }],
    });
  const role = chunk({ role: "assistant", content: "" }, null);
  const content = chunk({ content: chunkText }, null);
  const finish = chunk({}, "stop");
  const done = encoder.encode("data: [DONE]\n\n");
  // About 4 characters a token, at least one: within the service's bounds of a usage figure.
  const tokensOf = (chars: number) => Math.max(1, Math.ceil(chars / 4));
  const completionTokens = chunks;
  const metrics = encoder.encode(metricsText());
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, async (req) => {
    const path = new URL(req.url).pathname;
    if (path === "/v1/models") {
      return Response.json({ object: "list", data: [{ id: "bench-model", object: "model" }] });
    }
    if (path === "/metrics") {
      return new Response(metrics, { headers: { "content-type": "text/plain; version=0.0.4" } });
    }
    if (path === "/tokenize") {
      const { prompt } = await req.json();
      return Response.json({ count: tokensOf(String(prompt).length) });
    }
    if (path !== "/v1/chat/completions") return new Response("not found", { status: 404 });
    const body = await req.json() as {
      messages: { content: string }[];
      stream_options?: { include_usage?: boolean };
    };
    let chars = 0;
    for (const message of body.messages) chars += message.content.length;
    const promptTokens = tokensOf(chars) + 4 * body.messages.length;
    const usage = body.stream_options?.include_usage
      ? event({
        id: "chatcmpl-bench",
        object: "chat.completion.chunk",
        created,
        model: "bench-model",
        choices: [],
        usage: {
          prompt_tokens: promptTokens,
          completion_tokens: completionTokens,
          total_tokens: promptTokens + completionTokens,
        },
      })
      : undefined;
    const end = (controller: ReadableStreamDefaultController<Uint8Array>) => {
      controller.enqueue(finish);
      if (usage) controller.enqueue(usage);
      controller.enqueue(done);
      controller.close();
    };
    let sent = 0;
    const stream = gapMs === 0
      // Every event at once, each its own enqueue (as a zero-latency engine would write them).
      ? new ReadableStream<Uint8Array>({
        start(controller) {
          controller.enqueue(role);
          for (let i = 0; i < chunks; i++) controller.enqueue(content);
          end(controller);
        },
      })
      // One content chunk a pull, each after the gap: a frame a token. Behind after a late
      // timer, it does not catch up (an engine that falls behind sends its tokens later).
      : new ReadableStream<Uint8Array>({
        start(controller) {
          controller.enqueue(role);
        },
        async pull(controller) {
          await new Promise((resolve) => setTimeout(resolve, gapMs));
          controller.enqueue(content);
          if (++sent === chunks) end(controller);
        },
      }, { highWaterMark: 0 });
    return new Response(stream, {
      headers: { "content-type": "text/event-stream", "cache-control": "no-cache" },
    });
  });
  return `http://127.0.0.1:${server.addr.port}/v1`;
}

self.onmessage = (message: MessageEvent<StandInOptions>) => {
  self.postMessage({ url: serve(message.data) });
};
