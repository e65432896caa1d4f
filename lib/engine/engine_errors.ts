/**
 * The engine's failures as protocol errors: an error answer becomes the
 * `openai` client's error (whichever way the request was sent), and whatever
 * was thrown becomes a {@linkcode ServiceError} whose message is fit to pass
 * on to a client (one line, no markup, bounded).
 *
 * @module
 */

import OpenAI from "openai";
import { ServiceError } from "../protocol/errors.ts";

/** Milliseconds a client is asked to wait after the engine failed it. */
const RETRY_AFTER_MS = 1000;

/**
 * vLLM's words for a prompt that does not fit, in every version: "This model's
 * maximum context length is ...", "The decoder prompt (length N) is longer than
 * the maximum model length of M" (once images are counted, inside a stream),
 * "max_tokens=N cannot be greater than max_model_len=M"; and other servers'.
 */
const CONTEXT_OVERFLOW =
  /maximum context length|maximum model length|greater than max_model_len|context length|too many tokens|input is too long/i;

/** Most milliseconds of an engine's `Retry-After` passed on (a day: anything longer is a typo). */
const MAX_RETRY_AFTER_MS = 86_400_000;

/**
 * An engine's `Retry-After` (seconds, or an HTTP date) in milliseconds;
 * undefined when absent or unreadable.
 */
export function retryAfterOf(headers: Headers | undefined, now = Date.now()): number | undefined {
  const value = headers?.get("retry-after")?.trim();
  if (!value) return undefined;
  const ms = /^\d+(\.\d+)?$/.test(value) ? Number(value) * 1000 : Date.parse(value) - now;
  return Number.isFinite(ms) ? Math.min(MAX_RETRY_AFTER_MS, Math.max(0, Math.ceil(ms))) : undefined;
}

/**
 * Maps whatever the client threw to a protocol error: `cancelled` (with the
 * reason `signal` aborted with, when that is a {@linkcode ServiceError}),
 * `timeout` when `deadline` aborted, `context_overflow`, `engine_unavailable`
 * (5xx, 429, an unreachable engine, a broken stream) or `internal` (any other
 * refusal).
 */
export function mapError(
  error: unknown,
  signal: AbortSignal,
  deadline: AbortSignal,
): ServiceError {
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
        // The engine's own word on when to come back beats ours.
        retryAfterMs: retryAfterOf(error.headers) ?? RETRY_AFTER_MS,
      });
    }
    return new ServiceError("internal", `engine refused the request: ${described}`, {
      cause: error,
    });
  }
  if (error instanceof OpenAI.APIConnectionError || error instanceof TypeError) {
    return new ServiceError("engine_unavailable", "the engine cannot be reached", {
      cause: error,
      retryAfterMs: RETRY_AFTER_MS,
    });
  }
  // Anything else thrown while the stream was read.
  return streamFailed(String((error as Error)?.message ?? error), error);
}

/** `engine_unavailable` for a stream that failed with `message` (passed on when fit for a client). */
export function streamFailed(message: string, cause?: unknown): ServiceError {
  const detail = clientSafe(message);
  return new ServiceError(
    "engine_unavailable",
    detail === undefined ? "engine stream failed" : `engine stream failed: ${detail}`,
    cause === undefined
      ? { retryAfterMs: RETRY_AFTER_MS }
      : { cause, retryAfterMs: RETRY_AFTER_MS },
  );
}

/**
 * The error of vLLM's error event inside a 200 stream
 * (`data: {"error": {"message", "type", "code"}}`, then `[DONE]`): what
 * failed once the stream had begun (a prompt too long once its images are
 * counted, a schema the structured-output backend refuses). Its `code` is
 * the HTTP status vLLM would have answered: a 4xx is the request's fault and
 * becomes the `openai` client's error for that status (mapped as an error
 * answer is: not retried, not the engine's failure); anything else is the
 * engine's (`engine_unavailable`).
 */
export function streamedError(error: unknown): Error {
  const fields = typeof error === "string" ? { message: error } : error as {
    message?: unknown;
    code?: unknown;
  };
  const message = String(fields?.message ?? "");
  const code = Number(fields?.code);
  if (Number.isInteger(code) && code >= 400 && code < 500) {
    return OpenAI.APIError.generate(code, { error: fields }, message, new Headers());
  }
  return streamFailed(message);
}

/**
 * The words of an engine's refusal of a request (a 4xx other than 429, whose
 * text may name what the model does not take): its HTTP status, `text` as the
 * engine wrote it, to match, and `detail`, on one line and bounded, to pass
 * on to a client; undefined for any other error.
 */
export function refusedText(
  error: unknown,
): { status: number; text: string; detail: string } | undefined {
  if (!(error instanceof OpenAI.APIError) || error.status === undefined) return undefined;
  if (error.status < 400 || error.status === 429) return undefined;
  const fromJson = typeof error.error === "string"
    ? error.error
    : (error.error as { message?: unknown } | undefined)?.message;
  const text = typeof fromJson === "string" ? fromJson : error.message ?? "";
  const detail = text.replace(/\p{Cc}+/gu, " ").replace(/\s+/g, " ").trim().slice(0, 200);
  return { status: error.status, text, detail };
}

/** `engine_unavailable` for a stream that cannot be an answer, saying why. */
export function brokenStream(why: string): ServiceError {
  return new ServiceError("engine_unavailable", why, { retryAfterMs: RETRY_AFTER_MS });
}

/** The error of a 2xx answer that ended without `data: [DONE]`. */
export function incomplete(response: { status: number; headers: Headers }): ServiceError {
  // Named to a client: a media type's characters only.
  const type = (response.headers.get("content-type") ?? "").split(";")[0]
    .replace(/[^\w.+/-]/g, "").slice(0, 60) || "no content-type";
  return brokenStream(
    type === "text/event-stream"
      ? "the engine's stream ended before [DONE]: the answer is incomplete"
      : `the engine answered ${response.status} with ${type}, not an event stream`,
  );
}

/** The `openai` client's error for a non-2xx answer read directly, made as it makes them. */
export async function statusError(
  response: { status: number; headers: Headers; body: AsyncIterable<Uint8Array> },
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
export async function withErrorObject(response: Response): Promise<Response> {
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
export function clientSafe(text: string): string | undefined {
  const line = text.replace(/\p{Cc}+/gu, " ").replace(/\s+/g, " ").trim();
  if (line === "" || /<[a-z!/?][^>]*>/i.test(line)) return undefined;
  return line.length > MAX_DETAIL_CHARS ? `${line.slice(0, MAX_DETAIL_CHARS)}…` : line;
}
