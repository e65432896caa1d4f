/**
 * The live page's "try it", in process with a stand-in for the gateway: what
 * it refuses before anything runs, and the lines of reply bodies it streams.
 */

import { deepEqual, equal } from "node:assert/strict";
import type { ChatRequest, ReplyBody, RequestLimits } from "../../lib/protocol/mod.ts";
import { tryIt, type TryItSource } from "../../lib/observability/try_it.ts";

const LIMITS: RequestLimits = {
  maxPayloadBytes: 4096,
  maxMessageChars: 1000,
  maxPriority: 10,
  maxTokens: 256,
  temperature: 0.6,
  topP: 0.9,
  stream: true,
};
const SESSION = "dashboard-abcdef12";

/** A gateway that answers with `replies`, or is not up yet (`undefined`). */
function source(replies: ReplyBody[] | undefined, limits = LIMITS) {
  const asked: ChatRequest[] = [];
  let cancelled = 0;
  const stub: TryItSource = {
    projects: ["maze"],
    limits,
    ask: (request, deliver) => {
      if (replies === undefined) return undefined;
      asked.push(request);
      for (const reply of replies) deliver(reply);
      return () => cancelled++;
    },
  };
  return { stub, asked, cancelled: () => cancelled };
}

const post = (body: unknown, headers: Record<string, string> = {}) =>
  new Request("http://127.0.0.1:8080/dashboard/try", {
    method: "POST",
    headers: { "content-type": "application/json", host: "127.0.0.1:8080", ...headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });

const lines = async (response: Response) =>
  (await response.text()).trim().split("\n").map((line) => JSON.parse(line));

Deno.test("try it: refused before anything runs: other origins, not JSON, bad project or id", async () => {
  const { stub, asked } = source([]);
  const good = { project: "maze", session_id: SESSION, message: "hi" };
  const status = async (request: Request) => {
    const response = await tryIt(request, stub);
    await response.body?.cancel();
    return response.status;
  };
  equal(await status(post(good, { origin: "http://evil.example" })), 403);
  equal(await status(post(good, { "content-type": "text/plain" })), 415);
  equal(await status(post("{not json")), 400);
  equal(await status(post({ ...good, project: "elsewhere" })), 400);
  equal(await status(post({ ...good, session_id: "someone-else" })), 400);
  equal(await status(post({ ...good, message: "" })), 400);
  deepEqual(asked, []);
});

Deno.test("try it: the answer streams back as lines of reply bodies", async () => {
  const replies: ReplyBody[] = [
    { type: "delta", seq: 0, delta: "Hel" },
    { type: "delta", seq: 1, delta: "lo" },
    {
      type: "done",
      response: "Hello",
      finish_reason: "stop",
      usage: null,
      timing: { queue_ms: 0, ttft_ms: 1, total_ms: 2 },
    },
  ];
  const { stub, asked } = source(replies);
  const response = await tryIt(
    post({ project: "maze", session_id: SESSION, message: "hi" }, {
      origin: "http://127.0.0.1:8080",
    }),
    stub,
  );
  equal(response.status, 200);
  equal(response.headers.get("content-type"), "application/x-ndjson; charset=utf-8");
  deepEqual(await lines(response), replies);
  equal(asked.length, 1);
  deepEqual([asked[0].project, asked[0].sessionId, asked[0].message, asked[0].style], [
    "maze",
    SESSION,
    "hi",
    "json",
  ]);
});

Deno.test("try it: before the service serves, one engine_unavailable line", async () => {
  const { stub } = source(undefined);
  const response = await tryIt(post({ project: "maze", session_id: SESSION, message: "hi" }), stub);
  deepEqual(await lines(response), [{
    type: "error",
    error: { code: "engine_unavailable", message: "the service is starting" },
  }]);
});

Deno.test("try it: the page going away cancels a running answer", async () => {
  const { stub, cancelled } = source([{ type: "delta", seq: 0, delta: "a" }]);
  const response = await tryIt(post({ project: "maze", session_id: SESSION, message: "hi" }), stub);
  const reader = response.body!.getReader();
  await reader.read();
  await reader.cancel();
  equal(cancelled(), 1);
});

Deno.test("try it: a clip attached on the page is checked as a client's, and reaches the gateway", async () => {
  const wav = Deno.readFileSync(new URL("../fixtures/audio/hello.wav", import.meta.url));
  const url = `data:audio/wav;base64,${(wav as unknown as { toBase64(): string }).toBase64()}`;
  const limits = {
    ...LIMITS,
    maxPayloadBytes: 1 << 16,
    maxAudioClips: 1,
    maxAudioBytes: 1 << 16,
    maxAudioMs: 30_000,
  };
  const done: ReplyBody = {
    type: "done",
    response: "Heard.",
    finish_reason: "stop",
    usage: null,
    timing: { queue_ms: 0, ttft_ms: 1, total_ms: 2 },
  };
  const { stub, asked } = source([done], limits);
  const ask = async (body: Record<string, unknown>) => {
    const response = await tryIt(post({ project: "maze", session_id: SESSION, ...body }), stub);
    return { status: response.status, lines: await lines(response) };
  };
  // A clip alone is a message.
  deepEqual(await ask({ audio: [url] }), { status: 200, lines: [done] });
  deepEqual(asked.map((request) => [request.message, request.audio?.[0].kind]), [["", "wav"]]);
  const renamed = await ask({ message: "hi", audio: [url.replace("audio/wav", "audio/mpeg")] });
  equal(renamed.status, 400);
  deepEqual(renamed.lines, [{
    type: "error",
    error: {
      code: "invalid_request",
      message: "'audio[0]' says it is audio/mpeg but is a WAV (by its header)",
    },
  }]);
  equal(asked.length, 1);
});
