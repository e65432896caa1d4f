/**
 * A zero-latency OpenAI-compatible engine stand-in for the CPU benchmarks
 * (a Web Worker: post it {@linkcode StandInOptions}, it answers with its URL).
 * Every answer is the same text, sent at once: in one chunk, or in `chunks`
 * chunks of `chunkText` each (one SSE event each, all enqueued at once), then the finish chunk, `usage` when asked, and `data: [DONE]`.
 * It does as little work per request as it can (events are encoded once), so
 * that the machine's cores go to what is measured.
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
}

const encoder = new TextEncoder();
const event = (payload: unknown) => encoder.encode(`data: ${JSON.stringify(payload)}\n\n`);

function serve({ chunks, chunkText }: StandInOptions): string {
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
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, async (req) => {
    const path = new URL(req.url).pathname;
    if (path === "/v1/models") {
      return Response.json({ object: "list", data: [{ id: "bench-model", object: "model" }] });
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
    // Every event at once, each its own enqueue (as a zero-latency engine would write them).
    const stream = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(role);
        for (let i = 0; i < chunks; i++) controller.enqueue(content);
        controller.enqueue(finish);
        if (usage) controller.enqueue(usage);
        controller.enqueue(done);
        controller.close();
      },
    });
    return new Response(stream, {
      headers: { "content-type": "text/event-stream", "cache-control": "no-cache" },
    });
  });
  return `http://127.0.0.1:${server.addr.port}/v1`;
}

self.onmessage = (message: MessageEvent<StandInOptions>) => {
  self.postMessage({ url: serve(message.data) });
};
