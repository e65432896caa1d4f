/**
 * An engine that misbehaves on purpose: replies cut short or not streamed at
 * all, error pages instead of errors, absurd token counts. A real HTTP
 * stand-in engine (written on raw TCP, so it controls the framing of every
 * reply, including a body that ends when the connection closes), the service
 * as a child process, a real mosquitto and real MQTT clients. What is checked
 * is what a client sees and what the engine is sent on the next turn: the
 * history the service kept.
 */

import assert, { deepEqual, equal } from "node:assert/strict";
import {
  mosquittoTest as test,
  type ServiceProcess,
  type TestClient,
  waitFor,
  withServiceOn,
} from "./_helpers.ts";

const MODEL = "stand-in";
const ENCODER = new TextEncoder();
const DECODER = new TextDecoder();

interface ChatMessage {
  role: string;
  content: string;
}
interface ChatBody {
  messages: ChatMessage[];
  max_tokens?: number;
}

/** How a reply is framed on the wire. */
type Framing =
  /** `content-length`. */
  | "length"
  /** `transfer-encoding: chunked`, ending with the last chunk: a body that ends properly. */
  | "chunked"
  /** Neither: the body ends when the connection closes. */
  | "close";

interface Reply {
  readonly status: number;
  readonly contentType: string;
  readonly framing: Framing;
  /** Written one at a time (a chunk each, when chunked). */
  readonly pieces: readonly (string | Uint8Array)[];
  /** Further header lines (`retry-after: 7`). */
  readonly headers?: readonly string[];
}

/** The answer a well-behaved engine gives to `message`. */
const answerTo = (message: string) => `You said "${message}".`;

const words = (text: string) => text.match(/\S+\s*/g) ?? [];

/** One SSE event of a chat completion chunk holding `fields` (its choices, its usage). */
function chunkEvent(fields: Record<string, unknown>): string {
  const chunk = { id: "chatcmpl-stand-in", object: "chat.completion.chunk", created: 0 };
  return `data: ${JSON.stringify({ ...chunk, model: MODEL, ...fields })}\n\n`;
}

/** The chunk of a piece of the answer (`delta`), or of its end (`finish`). */
function event(delta: Record<string, unknown>, finish: string | null = null): string {
  return chunkEvent({ choices: [{ index: 0, delta, finish_reason: finish }] });
}

function usageEvent(usage: Record<string, number>): string {
  return chunkEvent({ choices: [], usage });
}

const sse = (framing: Framing, pieces: string[]): Reply => ({
  status: 200,
  contentType: "text/event-stream",
  framing,
  pieces,
});

/** A whole, well-formed stream answering `text`, with `usage`. */
function goodStream(text: string, usage: Record<string, number>): Reply {
  return sse("chunked", [
    event({ role: "assistant", content: "" }),
    ...words(text).map((word) => event({ content: word })),
    event({}, "stop"),
    usageEvent(usage),
    "data: [DONE]\n\n",
  ]);
}

const CUT_TEXT = "Half an answer that";
const cutTokens = () => words(CUT_TEXT).map((word) => event({ content: word }));
const SOME_USAGE = { prompt_tokens: 50, completion_tokens: 4, total_tokens: 54 };

const HTML_PAGE = "<html>\r\n<head><title>400 Bad Request</title></head>\r\n<body>\r\n" +
  "<center><h1>400 Bad Request</h1></center>\r\n<hr><center>nginx/1.24.0</center>\r\n" +
  "</body>\r\n</html>\r\n";
const WELCOME_PAGE = "<!DOCTYPE html>\n<html><head><title>Welcome to nginx!</title></head>" +
  "<body><h1>Welcome to nginx!</h1></body></html>\n";
const CONTEXT_MESSAGE = "This model's maximum context length is 4096 tokens. However, you " +
  "requested 9000 tokens (8488 in the messages, 512 in the completion). Please reduce the " +
  "length of the messages or completion.";

/** A message answered whole, but in CRLF lines written 5 bytes at a time (UTF-8 split too). */
const SPLIT = "split é🧬";

/**
 * The replies of the stand-in engine, chosen by the last user message; any
 * other message gets a whole, well-formed answer.
 */
const FAULTS: Record<string, (body: ChatBody) => Reply> = {
  [SPLIT]: () => {
    const whole = goodStream(answerTo(SPLIT), SOME_USAGE);
    const bytes = ENCODER.encode(whole.pieces.join("").replaceAll("\n", "\r\n"));
    const pieces = [];
    for (let i = 0; i < bytes.length; i += 5) pieces.push(bytes.subarray(i, i + 5));
    return { ...whole, pieces };
  },
  // A stream cut in the middle: no finish_reason, no [DONE], then the connection closes.
  "cut-close": () => sse("close", [event({ role: "assistant", content: "" }), ...cutTokens()]),
  // The same, in a chunked body that ends properly after the cut.
  "cut-chunked": () => sse("chunked", [event({ role: "assistant", content: "" }), ...cutTokens()]),
  // A finish_reason and usage, but the body ends before [DONE].
  "no-done": () =>
    sse("chunked", [
      event({ role: "assistant", content: "" }),
      ...cutTokens(),
      event({}, "stop"),
      usageEvent(SOME_USAGE),
    ]),
  // [DONE], but no chunk ever said why the answer ended.
  "no-finish": () =>
    sse("chunked", [
      event({ role: "assistant", content: "" }),
      ...cutTokens(),
      usageEvent(SOME_USAGE),
      "data: [DONE]\n\n",
    ]),
  // vLLM's report of a failure after the stream began: an error event, then [DONE].
  "error-event": () =>
    sse("chunked", [
      event({ role: "assistant", content: "" }),
      ...cutTokens(),
      `data: ${
        JSON.stringify({
          error: { message: "EngineCore failed", type: "InternalServerError", code: 500 },
        })
      }\n\n`,
      "data: [DONE]\n\n",
    ]),
  // vLLM's in-stream refusal of the request itself (a schema its structured-output backend
  // cannot compile): code 400, the request's fault, not the engine's.
  "schema-event": () =>
    sse("chunked", [
      `data: ${
        JSON.stringify({
          error: {
            message: "The provided JSON schema contains features not supported by xgrammar.",
            type: "BadRequestError",
            param: null,
            code: 400,
          },
        })
      }\n\n`,
      "data: [DONE]\n\n",
    ]),
  // v0.11.0's in-stream overflow once images are counted: with history, the prompt is too long.
  "overflow-event": (body) =>
    body.messages.length > 2
      ? sse("chunked", [
        `data: ${
          JSON.stringify({
            error: {
              message: "The decoder prompt (length 5000) is longer than the maximum model " +
                "length of 4096. Make sure that `max_model_len` is no smaller than the number " +
                "of text tokens plus multimodal tokens.",
              type: "BadRequestError",
              param: null,
              code: 400,
            },
          })
        }\n\n`,
        "data: [DONE]\n\n",
      ])
      : goodStream(answerTo("overflow-event"), SOME_USAGE),
  // vLLM's refusal of a max_tokens the context cannot hold, with history.
  "max-tokens-400": (body) =>
    body.messages.length > 2
      ? json(400, {
        error: {
          message:
            "max_tokens=5000 cannot be greater than max_model_len=4096. Please request fewer output tokens.",
          type: "BadRequestError",
          param: null,
          code: 400,
        },
      })
      : goodStream(answerTo("max-tokens-400"), SOME_USAGE),
  // A busy engine (or the proxy before it): come back in 7 s.
  "busy-429": () => ({
    ...json(429, { error: { message: "Too many requests", code: 429 } }),
    headers: ["retry-after: 7"],
  }),
  // The body ends before any text: nothing was streamed, so this one is retried.
  "empty-stream": () => sse("chunked", [event({ role: "assistant", content: "" })]),
  // A 200 that is a web page (a proxy's default page), not an event stream.
  "html-200": () => whole(200, "text/html", WELCOME_PAGE),
  // A 200 with a whole, non-streamed completion: an engine that ignored `stream: true`.
  "json-200": () =>
    json(200, {
      id: "chatcmpl-stand-in",
      object: "chat.completion",
      created: 0,
      model: MODEL,
      choices: [{
        index: 0,
        message: { role: "assistant", content: "A whole answer, not streamed." },
        finish_reason: "stop",
      }],
      usage: SOME_USAGE,
    }),
  // A proxy's error page.
  "html-400": () => whole(400, "text/html", HTML_PAGE),
  // vLLM's own error body: its message is worth passing on.
  "json-400": () =>
    json(400, {
      error: {
        message: "temperature must be at most 2, got 7",
        type: "BadRequestError",
        param: null,
        code: 400,
      },
    }),
  // vLLM before 0.10.1: the message at the top level.
  "old-overflow-400": () =>
    json(400, {
      object: "error",
      message: CONTEXT_MESSAGE,
      type: "BadRequestError",
      param: null,
      code: 400,
    }),
  // A plain-text body: short and readable, so passed on.
  "text-400": () => whole(400, "text/plain", "unknown model\n"),
  "overflow-400": () =>
    json(400, {
      error: { message: CONTEXT_MESSAGE, type: "BadRequestError", param: null, code: 400 },
    }),
  // Token counts no engine could mean: 10^9 prompt tokens for a prompt of a few hundred.
  "absurd-prompt": () =>
    goodStream(answerTo("absurd-prompt"), {
      prompt_tokens: 1e9,
      completion_tokens: 6,
      total_tokens: 1e9 + 6,
    }),
  "absurd-completion": () =>
    goodStream(answerTo("absurd-completion"), {
      prompt_tokens: 300,
      completion_tokens: 1e9,
      total_tokens: 1e9 + 300,
    }),
};

/** The stand-in engine. */
interface StandIn {
  /** Base URL including `/v1`. */
  readonly url: string;
  /** The chat requests received, oldest first. */
  readonly requests: ChatBody[];
  /** Chat requests whose last user message was `message`. */
  count(message: string): number;
  /** While set, every request is answered 503 "model loading" (a model still being loaded). */
  loading: boolean;
  /** Requests answered 503 while loading. */
  readonly refusedLoading: number;
  close(): Promise<void>;
}

const lastUser = (body: ChatBody) => body.messages.findLast((m) => m.role === "user")?.content;

/** A reply of one piece, with its `content-length`. */
function whole(status: number, contentType: string, body: string): Reply {
  return { status, contentType, framing: "length", pieces: [body] };
}

function json(status: number, body: unknown): Reply {
  return whole(status, "application/json", JSON.stringify(body));
}

function route(method: string, path: string, body: string, requests: ChatBody[]): Reply {
  if (method === "GET" && path === "/v1/models") {
    return json(200, { object: "list", data: [{ id: MODEL, object: "model", owned_by: "test" }] });
  }
  if (method === "POST" && path === "/v1/chat/completions") {
    const chat = JSON.parse(body) as ChatBody;
    requests.push(chat);
    const message = lastUser(chat) ?? "";
    const fault = FAULTS[message];
    if (fault) return fault(chat);
    const text = answerTo(message);
    return goodStream(text, { prompt_tokens: 300, completion_tokens: 6, total_tokens: 306 });
  }
  return json(404, { error: { message: `no route for ${method} ${path}`, code: 404 } });
}

/** Writes `reply` with its framing, then closes the connection. */
async function write(conn: Deno.Conn, reply: Reply): Promise<void> {
  const bodies = reply.pieces.map((piece) =>
    typeof piece === "string" ? ENCODER.encode(piece) : piece
  );
  const length = bodies.reduce((sum, body) => sum + body.length, 0);
  const framing = reply.framing === "length"
    ? `content-length: ${length}\r\n`
    : reply.framing === "chunked"
    ? "transfer-encoding: chunked\r\n"
    : "";
  const writeAll = async (bytes: Uint8Array) => {
    for (let done = 0; done < bytes.length;) done += await conn.write(bytes.subarray(done));
  };
  await writeAll(ENCODER.encode(
    `HTTP/1.1 ${reply.status} X\r\ncontent-type: ${reply.contentType}\r\n` +
      (reply.headers ?? []).map((line) => `${line}\r\n`).join("") +
      `${framing}connection: close\r\n\r\n`,
  ));
  for (const body of bodies) {
    if (reply.framing === "chunked") {
      await writeAll(ENCODER.encode(`${body.length.toString(16)}\r\n`));
      await writeAll(body);
      await writeAll(ENCODER.encode("\r\n"));
    } else {
      await writeAll(body);
    }
  }
  if (reply.framing === "chunked") await writeAll(ENCODER.encode("0\r\n\r\n"));
}

/** Reads one request (head and a `content-length` body) from `conn`. */
async function read(
  conn: Deno.Conn,
): Promise<{ method: string; path: string; body: string } | undefined> {
  let buffer = new Uint8Array(0);
  const more = async () => {
    const chunk = new Uint8Array(65536);
    const n = await conn.read(chunk);
    if (n === null) return false;
    const next = new Uint8Array(buffer.length + n);
    next.set(buffer);
    next.set(chunk.subarray(0, n), buffer.length);
    buffer = next;
    return true;
  };
  let headEnd: number;
  while ((headEnd = DECODER.decode(buffer).indexOf("\r\n\r\n")) === -1) {
    if (!(await more())) return undefined;
  }
  // Heads are ASCII: string and byte offsets agree.
  const [requestLine, ...headers] = DECODER.decode(buffer.subarray(0, headEnd)).split("\r\n");
  const [method, path] = requestLine.split(" ");
  const lengthHeader = headers.find((h) => /^content-length:/i.test(h));
  const length = lengthHeader ? Number(lengthHeader.split(":")[1]) : 0;
  while (buffer.length < headEnd + 4 + length) {
    if (!(await more())) return undefined;
  }
  return { method, path, body: DECODER.decode(buffer.subarray(headEnd + 4, headEnd + 4 + length)) };
}

/** Starts the stand-in engine on a free port. */
function startStandIn(): StandIn {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const requests: ChatBody[] = [];
  const handling = new Set<Promise<void>>();
  const serve = async (conn: Deno.Conn) => {
    try {
      const request = await read(conn);
      if (request && standIn.loading) {
        if (request.path === "/v1/chat/completions") requests.push(JSON.parse(request.body));
        refusedLoading++;
        await write(conn, json(503, { error: { message: "model loading", code: 503 } }));
      } else if (request) {
        await write(conn, route(request.method, request.path, request.body, requests));
      }
    } catch {
      // The service hung up first.
    } finally {
      try {
        conn.close();
      } catch { /* closed */ }
    }
  };
  const accepting = (async () => {
    for await (const conn of listener) {
      const handled = serve(conn);
      handling.add(handled);
      handled.finally(() => handling.delete(handled));
    }
  })().catch(() => {});
  const { port } = listener.addr as Deno.NetAddr;
  let refusedLoading = 0;
  const standIn: StandIn = {
    url: `http://127.0.0.1:${port}/v1`,
    requests,
    count: (message) => requests.filter((body) => lastUser(body) === message).length,
    loading: false,
    get refusedLoading() {
      return refusedLoading;
    },
    async close() {
      listener.close();
      await accepting;
      await Promise.all(handling);
    },
  };
  return standIn;
}

interface Fixture {
  engine: StandIn;
  service: ServiceProcess;
  client: TestClient;
  /** Sends `message` in `session` and returns the final reply (`done` or `error`). */
  ask(session: string, id: string, message: string): Promise<Record<string, unknown>>;
  /** Every `done` the client received for request `id`. */
  dones(id: string): Record<string, unknown>[];
}

/** Runs `fn` against a fresh broker, stand-in engine, service (one worker) and client. */
async function withStandIn(args: string[], fn: (f: Fixture) => Promise<void>): Promise<void> {
  const engine = startStandIn();
  try {
    await withServiceOn(engine.url, {
      args: ["--projects=maze", "--workers=1", "--rate-limit=0", "--engine-retries=1", ...args],
    }, ({ service, client }) =>
      fn({
        engine,
        service,
        client,
        async ask(session, id, message) {
          await client.send("maze/user_input", { session_id: session, message, request_id: id });
          return (await client.final(session, id, 30_000)).json!;
        },
        dones: (id) =>
          client.received.filter((m) => m.json?.type === "done" && m.json.request_id === id)
            .map((m) => m.json!),
      }));
  } finally {
    await engine.close();
  }
}

type JsonReply = Record<string, unknown>;
const errorOf = (reply: JsonReply) => reply.error as { code: string; message: string } | undefined;

/**
 * The conversation the engine was last sent, without the system prompt:
 * what the service kept of the session, plus the new message.
 */
function lastConversation(engine: StandIn): ChatMessage[] {
  const messages = engine.requests.at(-1)!.messages;
  equal(messages[0].role, "system");
  return messages.slice(1).map(({ role, content }) => ({ role, content }));
}

/** The history of whole turns answering `messages`, then `next` from the user. */
function turns(messages: string[], next: string): ChatMessage[] {
  return [
    ...messages.flatMap((message) => [
      { role: "user", content: message },
      { role: "assistant", content: answerTo(message) },
    ]),
    { role: "user", content: next },
  ];
}

test("a stream that ends before its finish_reason or [DONE] is an engine_unavailable error; no half turn is saved", async () => {
  await withStandIn([], async ({ engine, ask, dones }) => {
    equal((await ask("s", "0", "first")).type, "done");
    // A whole stream however it is cut into pieces: an answer, kept.
    equal((await ask("s", "split", SPLIT)).response, answerTo(SPLIT));
    const good = ["first", SPLIT];
    const faults = ["cut-close", "cut-chunked", "no-done", "no-finish", "error-event"];
    for (const fault of [...faults, "empty-stream"]) {
      const reply = await ask("s", fault, fault);
      equal(errorOf(reply)?.code, "engine_unavailable", `${fault}: ${JSON.stringify(reply)}`);
      // The next turn's prompt holds the whole turns only: nothing of the cut answer.
      const next = `after ${fault}`;
      equal((await ask("s", next, next)).type, "done");
      deepEqual(lastConversation(engine), turns(good, next), fault);
      good.push(next);
      equal(dones(fault).length, 0, `${fault} was also answered with done`);
    }
    // Text was streamed before the cut: not retried. Nothing was: retried (--engine-retries=1).
    for (const fault of faults) equal(engine.count(fault), 1, fault);
    equal(engine.count("empty-stream"), 2);
  });
});

test("a 200 that is not an event stream (a web page, a whole JSON completion) is an engine_unavailable error, retried; no empty turn is saved", async () => {
  await withStandIn([], async ({ engine, ask, dones }) => {
    equal((await ask("s", "0", "first")).type, "done");
    const good = ["first"];
    for (const fault of ["html-200", "json-200"]) {
      const reply = await ask("s", fault, fault);
      equal(errorOf(reply)?.code, "engine_unavailable", `${fault}: ${JSON.stringify(reply)}`);
      assert(!/[<>]/.test(errorOf(reply)!.message), errorOf(reply)!.message);
      equal(engine.count(fault), 2, `${fault} was not retried once`);
      const next = `after ${fault}`;
      equal((await ask("s", next, next)).type, "done");
      deepEqual(lastConversation(engine), turns(good, next), fault);
      good.push(next);
      equal(dones(fault).length, 0, `${fault} was also answered with done`);
    }
  });
});

test("an engine's 400 is described in short, never echoed as HTML; a JSON error's message is kept", async () => {
  await withStandIn([], async ({ engine, ask }) => {
    const html = errorOf(await ask("s", "1", "html-400"))!;
    assert(html.message.includes("400"), html.message);
    assert(!/[<>]|html|nginx/i.test(html.message), `raw HTML echoed: ${html.message}`);
    assert(html.message.length <= 120, `not short: ${html.message}`);
    equal(engine.count("html-400"), 1);

    const refused = errorOf(await ask("s", "2", "json-400"))!;
    assert(refused.message.includes("temperature must be at most 2, got 7"), refused.message);

    const text = errorOf(await ask("s", "3", "text-400"))!;
    assert(text.message.includes("400: unknown model"), text.message);

    const overflow = errorOf(await ask("s", "4", "overflow-400"))!;
    equal(overflow.code, "context_overflow");
    assert(overflow.message.includes(CONTEXT_MESSAGE), overflow.message);
    const old = errorOf(await ask("s", "5", "old-overflow-400"))!;
    equal(old.code, "context_overflow", old.message);
    assert(old.message.includes(CONTEXT_MESSAGE), old.message);
  });
});

test("vLLM: an error event with code 400 inside a 200 stream is the request's fault: not retried, not counted against the engine", async () => {
  await withStandIn([], async ({ engine, service, ask }) => {
    for (let i = 0; i < 4; i++) {
      const refused = errorOf(await ask("s", `schema-${i}`, "schema-event"))!;
      equal(refused.code, "internal", refused.message);
      assert(refused.message.includes("not supported by xgrammar"), refused.message);
    }
    equal(engine.count("schema-event"), 4);
    // Four in a row would have opened the circuit were they counted as the engine's failures.
    assert(!service.log().includes("Engine unavailable"), service.log());
    equal((await ask("s", "after", "after")).type, "done");
  });
});

test("vLLM: every overflow wording (in-stream decoder prompt, max_tokens > max_model_len) trims the history and tries again", async () => {
  await withStandIn([], async ({ engine, ask }) => {
    for (const fault of ["overflow-event", "max-tokens-400"]) {
      const session = `o-${fault}`;
      equal((await ask(session, "1", "first")).type, "done");
      const reply = await ask(session, "2", fault);
      equal(reply.type, "done", JSON.stringify(reply));
      equal(engine.count(fault), 2, fault);
      // Tried again with nothing but the system prompt and this message.
      deepEqual(lastConversation(engine), [{ role: "user", content: fault }]);
    }
  });
});

test("a 429 is not retried at once; its Retry-After reaches the client as retry_after_ms", async () => {
  await withStandIn([], async ({ engine, ask }) => {
    const busy = await ask("s", "1", "busy-429");
    equal(errorOf(busy)?.code, "engine_unavailable", JSON.stringify(busy));
    equal((busy.error as { retry_after_ms?: number }).retry_after_ms, 7000);
    equal(engine.count("busy-429"), 1);
  });
});

test("during a 503 'model loading' a request is held for --engine-wait, though the circuit was not open when it came", async () => {
  await withStandIn([], async ({ engine, client }) => {
    engine.loading = true;
    await client.send("maze/user_input", { session_id: "l", message: "loading?", request_id: "1" });
    // The turn reached the loading engine, and the health probe found it loading too.
    await waitFor(() =>
      engine.count("loading?") >= 1 && engine.refusedLoading > engine.count("loading?")
    );
    engine.loading = false;
    const reply = (await client.final("l", "1", 30_000)).json!;
    equal(reply.type, "done", JSON.stringify(reply));
    equal(reply.response, answerTo("loading?"));
  });
});

test("absurd usage figures are replaced by estimates, logged once, and do not empty the history", async () => {
  await withStandIn(["--log-format=json"], async ({ engine, service, ask }) => {
    for (const fault of ["absurd-prompt", "absurd-completion"]) {
      const reply = await ask(fault, fault, fault);
      equal(reply.type, "done", JSON.stringify(reply));
      // The next turn still carries the first: a 10^9-token turn would have been dropped.
      equal((await ask(fault, `${fault}-next`, "next")).type, "done");
      deepEqual(lastConversation(engine), turns([fault], "next"), fault);
      const usage = reply.usage as Record<string, number>;
      // Bounded by what was sent and received: a prompt of a few hundred tokens, a short answer.
      assert(usage.prompt_tokens > 0 && usage.prompt_tokens < 20_000, JSON.stringify(usage));
      assert(
        usage.completion_tokens > 0 && usage.completion_tokens <= 512,
        JSON.stringify(usage),
      );
      equal(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens);
    }
    // Stopped first, so that all it wrote has been read.
    await service.stop();
    const warnings = service.log().split("\n").filter((line) => /usage out of bounds/i.test(line));
    equal(warnings.length, 1, service.log().slice(-3000));
    // A record in the format the service was told to log in, from the worker that saw it.
    const record = JSON.parse(warnings[0]);
    deepEqual([record.level, record.logger], ["WARN", "vllm-mqtt.engine"]);
  });
});
