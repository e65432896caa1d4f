/**
 * A stand-in engine for the end-to-end tests of images and audio: it records
 * every chat request it is sent, answers with one streamed text and the usage
 * it is told to report, and refuses what the test's `refuse` refuses (each
 * test file words its refusals as vLLM does for its kind of input).
 *
 * @module
 */

import { type ServiceProcess, type TestClient, withServiceOn } from "./_helpers.ts";

/** A chat request as the stand-in records it. */
export interface Recorded {
  messages: { role: string; content: unknown }[];
}

/** A running stand-in engine. */
export interface RecordingEngine {
  /** Base URL including `/v1`. */
  readonly url: string;
  /** The chat requests received, oldest first. */
  readonly requests: Recorded[];
  close(): Promise<void>;
}

/** Options of {@linkcode startRecordingEngine}. */
export interface RecordingEngineOptions {
  /** The text of every answer. */
  readonly text: string;
  /** The prompt and completion tokens every answer reports. */
  readonly usage: { readonly prompt_tokens: number; readonly completion_tokens: number };
  /**
   * The refusal of a request, or undefined to answer it.
   * @default {() => undefined}
   */
  readonly refuse?: (body: Recorded) => Response | undefined;
}

/** Starts a stand-in engine serving model `stand-in` on a free port. */
export function startRecordingEngine(options: RecordingEngineOptions): RecordingEngine {
  const requests: Recorded[] = [];
  const event = (body: unknown) => `data: ${JSON.stringify(body)}\n\n`;
  const base = { id: "chatcmpl-1", object: "chat.completion.chunk", created: 0, model: "stand-in" };
  const { prompt_tokens, completion_tokens } = options.usage;
  const answer = [
    event({
      ...base,
      choices: [{
        index: 0,
        delta: { role: "assistant", content: options.text },
        finish_reason: null,
      }],
    }),
    event({ ...base, choices: [{ index: 0, delta: {}, finish_reason: "stop" }] }),
    event({
      ...base,
      choices: [],
      usage: { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens },
    }),
    "data: [DONE]\n\n",
  ].join("");
  const server = Deno.serve(
    { port: 0, hostname: "127.0.0.1", onListen: () => {} },
    async (request) => {
      const { pathname } = new URL(request.url);
      if (pathname === "/v1/models") {
        return Response.json({ object: "list", data: [{ id: "stand-in", object: "model" }] });
      }
      if (pathname !== "/v1/chat/completions") return new Response("no", { status: 404 });
      const body = await request.json() as Recorded;
      requests.push(body);
      return options.refuse?.(body) ??
        new Response(answer, { headers: { "content-type": "text/event-stream" } });
    },
  );
  const { port } = server.addr as Deno.NetAddr;
  return { url: `http://127.0.0.1:${port}/v1`, requests, close: () => server.shutdown() };
}

/**
 * Runs `fn` against a fresh broker, the service on `engine` (one worker, no
 * rate limit, two engine retries) and a client; closes the engine after.
 */
export async function withRecordingEngine<E extends RecordingEngine>(
  engine: E,
  args: string[],
  fn: (f: { engine: E; client: TestClient; service: ServiceProcess }) => Promise<void>,
): Promise<void> {
  try {
    await withServiceOn(engine.url, {
      args: ["--projects=maze", "--workers=1", "--rate-limit=0", "--engine-retries=2", ...args],
    }, ({ client, service }) => fn({ engine, client, service }));
  } finally {
    await engine.close();
  }
}

/** The content of the user message of the last request `engine` received. */
export const lastUserContent = (engine: RecordingEngine): unknown =>
  engine.requests.at(-1)!.messages.findLast((m) => m.role === "user")!.content;
