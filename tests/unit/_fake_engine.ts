/**
 * A scripted OpenAI-compatible engine for unit tests: an in-process HTTP
 * server on a free loopback port that answers each chat completion with the
 * next scripted answer, and keeps the request bodies it was sent. Real HTTP,
 * so the engine client takes its own path (its own socket for `http:`,
 * chunked event streams, error answers as vLLM writes them).
 */

/** vLLM's words for a prompt that does not fit, in every version it has used. */
export const OVERFLOW_WORDINGS = [
  "This model's maximum context length is 4096 tokens. However, you requested 4200 tokens " +
  "(4100 in the messages, 100 in the completion). Please reduce the length of the messages or completion.",
  "The decoder prompt (length 5000) is longer than the maximum model length of 4096. " +
  "Make sure that `max_model_len` is no smaller than the number of text tokens plus multimodal tokens.",
  "max_tokens=4000 cannot be greater than max_model_len=4096. Please request fewer output tokens.",
];

/** One scripted answer: a status, headers and a body sent in the given pieces. */
export interface Answer {
  readonly status: number;
  readonly headers?: Record<string, string>;
  readonly pieces: readonly string[];
}

/** What a chat completion request asked. */
export interface Asked {
  readonly messages: { role: string; content: unknown }[];
  readonly max_tokens?: number;
  readonly response_format?: unknown;
  readonly [field: string]: unknown;
}

/** A stream of text deltas as vLLM sends it, ending with `finish_reason` and usage when given. */
export function streamOf(
  texts: readonly string[],
  options: { finish?: string; done?: boolean; usage?: boolean } = {},
): Answer {
  const { finish = "stop", done = true, usage = false } = options;
  const event = (chunk: unknown) => `data: ${JSON.stringify(chunk)}\n\n`;
  const choice = (delta: unknown, finishReason: string | null) => ({
    id: "chatcmpl-1",
    object: "chat.completion.chunk",
    created: 0,
    model: "m",
    choices: [{ index: 0, delta, finish_reason: finishReason }],
  });
  const pieces = [
    event(choice({ role: "assistant", content: "" }, null)),
    ...texts.map((text) => event(choice({ content: text }, null))),
    event(choice({}, finish)),
  ];
  if (usage) {
    pieces.push(event({
      id: "chatcmpl-1",
      object: "chat.completion.chunk",
      created: 0,
      model: "m",
      choices: [],
      usage: {
        prompt_tokens: 20,
        completion_tokens: texts.length,
        total_tokens: 20 + texts.length,
      },
    }));
  }
  if (done) pieces.push("data: [DONE]\n\n");
  return { status: 200, headers: { "content-type": "text/event-stream" }, pieces };
}

/**
 * vLLM's error event inside a 200 stream (the stream began before the
 * failure was known), after `texts`, then `[DONE]`.
 */
export function streamedErrorOf(
  message: string,
  code: number,
  texts: readonly string[] = [],
): Answer {
  const stream = streamOf(texts, { done: false }).pieces.slice(0, -1);
  const error = { error: { message, type: "BadRequestError", param: null, code } };
  return {
    status: 200,
    headers: { "content-type": "text/event-stream" },
    pieces: [...stream, `data: ${JSON.stringify(error)}\n\n`, "data: [DONE]\n\n"],
  };
}

/** An error answer as vLLM's server writes it (`{"error": {...}}`). */
export function errorOf(
  status: number,
  message: string,
  headers: Record<string, string> = {},
): Answer {
  const error = { message, type: "BadRequestError", param: null, code: status };
  return {
    status,
    headers: { "content-type": "application/json", ...headers },
    pieces: [JSON.stringify({ error })],
  };
}

/** A fake engine answering with `answers`, in order; one more request than scripted fails the test. */
export class FakeEngine implements AsyncDisposable {
  readonly asked: Asked[] = [];
  readonly #answers: Answer[];
  readonly #server: Deno.HttpServer<Deno.NetAddr>;

  constructor(answers: readonly Answer[]) {
    this.#answers = [...answers];
    this.#server = Deno.serve(
      { hostname: "127.0.0.1", port: 0, onListen: () => {} },
      (request) => this.#answer(request),
    );
  }

  /** Base URL including `/v1`. */
  get baseUrl(): string {
    return `http://127.0.0.1:${this.#server.addr.port}/v1`;
  }

  /** Scripted answers not asked for. */
  get left(): number {
    return this.#answers.length;
  }

  async #answer(request: Request): Promise<Response> {
    if (new URL(request.url).pathname !== "/v1/chat/completions") {
      return new Response("not found", { status: 404 });
    }
    this.asked.push(await request.json());
    const answer = this.#answers.shift();
    if (!answer) return new Response("no answer scripted", { status: 599 });
    const encoder = new TextEncoder();
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        for (const piece of answer.pieces) controller.enqueue(encoder.encode(piece));
        controller.close();
      },
    });
    return new Response(body, { status: answer.status, headers: answer.headers });
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.#server.shutdown();
  }
}
