/** The engine's failures as protocol errors (lib/engine/engine_errors.ts). */

import { equal, match } from "node:assert/strict";
import OpenAI from "openai";
import {
  clientSafe,
  incomplete,
  mapError,
  statusError,
  withErrorObject,
} from "../../lib/engine/engine_errors.ts";
import { ServiceError } from "../../lib/protocol/errors.ts";

const ENCODER = new TextEncoder();
const LIVE = new AbortController().signal;

/** The error an engine's answer `status` with `body` becomes, as the engine client maps it. */
async function mapped(status: number, body: string, type = "application/json") {
  const error = await statusError({
    status,
    headers: new Headers({ "content-type": type }),
    body: (async function* () {
      yield ENCODER.encode(body);
    })(),
  });
  return mapError(error, LIVE, LIVE);
}

Deno.test("mapError: vLLM's context-length 400 is context_overflow, with its message", async () => {
  const error = await mapped(
    400,
    JSON.stringify({
      error: { message: "This model's maximum context length is 4096 tokens.", code: 400 },
    }),
  );
  equal(error.code, "context_overflow");
  equal(error.message, "400: This model's maximum context length is 4096 tokens.");
});

Deno.test("mapError: 5xx and 429 are engine_unavailable and may be retried", async () => {
  const error = await mapped(503, JSON.stringify({ error: { message: "overloaded" } }));
  equal(error.code, "engine_unavailable");
  equal(error.message, "engine answered 503: overloaded");
  equal(error.retryAfterMs, 1000);
  equal((await mapped(429, "")).code, "engine_unavailable");
});

Deno.test("mapError: another refusal is internal; vLLM's old top-level message is read", async () => {
  const error = await mapped(404, JSON.stringify({ object: "error", message: "no such model" }));
  equal(error.code, "internal");
  equal(error.message, "engine refused the request: 404: no such model");
});

Deno.test("mapError: an HTML page becomes the status's reason phrase", async () => {
  const error = await mapped(502, "<html><body><h1>Bad gateway</h1></body></html>", "text/html");
  equal(error.message, "engine answered 502 Bad Gateway");
});

Deno.test("mapError: a plain-text body is passed on in short", async () => {
  const error = await mapped(500, "engine\ncore  died", "text/plain");
  equal(error.message, "engine answered 500: engine core died");
});

Deno.test("mapError: aborting, the deadline, an unreachable engine, anything else", () => {
  const aborted = new AbortController();
  aborted.abort();
  equal(mapError(new Error("x"), aborted.signal, LIVE).code, "cancelled");
  const withReason = new AbortController();
  const reason = new ServiceError("cancelled", "the client went away");
  withReason.abort(reason);
  equal(mapError(new Error("x"), withReason.signal, LIVE), reason);
  equal(mapError(new Error("x"), LIVE, aborted.signal).code, "timeout");
  equal(mapError(new TypeError("refused"), LIVE, LIVE).message, "the engine cannot be reached");
  const connection = new OpenAI.APIConnectionError({ cause: new Error("reset") });
  equal(mapError(connection, LIVE, LIVE).code, "engine_unavailable");
  equal(
    mapError(new Error("socket hang up"), LIVE, LIVE).message,
    "engine stream failed: socket hang up",
  );
  const own = new ServiceError("internal", "mine");
  equal(mapError(own, aborted.signal, aborted.signal), own);
});

Deno.test("incomplete: a cut event stream, or an answer that is no event stream", () => {
  const cut = incomplete({
    status: 200,
    headers: new Headers({ "content-type": "text/event-stream" }),
  });
  match(cut.message, /ended before \[DONE\]/);
  const page = incomplete({
    status: 200,
    headers: new Headers({ "content-type": "text/html; x" }),
  });
  equal(page.message, "the engine answered 200 with text/html, not an event stream");
  equal(page.code, "engine_unavailable");
});

Deno.test("withErrorObject: a top-level message is moved into an error object", async () => {
  const answer = await withErrorObject(
    new Response(JSON.stringify({ detail: "Not Found" }), {
      status: 404,
      headers: { "content-type": "application/json" },
    }),
  );
  equal(
    await answer.text(),
    JSON.stringify({ error: { detail: "Not Found", message: "Not Found" } }),
  );
  equal(answer.status, 404);
});

Deno.test("clientSafe: one line, no markup, bounded", () => {
  equal(clientSafe("  a\tb\n c "), "a b c");
  equal(clientSafe("<p>oops</p>"), undefined);
  equal(clientSafe(""), undefined);
  equal(clientSafe("x".repeat(500)), `${"x".repeat(400)}…`);
});
