/**
 * Reply payloads: v1 JSON (`delta`, `done`, `error`) or, for the original
 * deployment's clients, plain text once per answer.
 *
 * @module
 */

import { errorHint, hintObject } from "../games/hints.ts";
import type { ErrorCode } from "./errors.ts";
import type { ReplyStyle } from "./reply_style.ts";

/** Token counts of one answer, as the engine reported them. */
export interface Usage {
  readonly prompt_tokens: number;
  readonly completion_tokens: number;
  readonly total_tokens: number;
}

/**
 * The `timing` of a `done` reply: where the time of one request went, in whole
 * milliseconds from its arrival (the statistics keep the unrounded
 * measurement, `RequestDurations`).
 */
export interface ReplyTiming {
  readonly queue_ms: number;
  readonly ttft_ms: number | null;
  readonly total_ms: number;
}

/** The reply bodies, without the `session_id` and `request_id` every reply carries. */
export type ReplyBody =
  | { readonly type: "delta"; readonly seq: number; readonly delta: string }
  | {
    readonly type: "done";
    readonly response: string;
    readonly finish_reason: string;
    readonly usage: Usage | null;
    readonly timing: ReplyTiming;
    /** The answer was not generated again: its `request_id` was answered before (a retry). */
    readonly repeated?: true;
    /**
     * The session's stored history could not be read (a damaged store) and
     * was dropped: this turn started a fresh conversation.
     */
    readonly history_lost?: true;
    /**
     * The answer was larger than the broker takes in one message: its text
     * is in the deltas before this `done`, and `response` is empty.
     */
    readonly response_in_deltas?: true;
  }
  | {
    readonly type: "error";
    readonly error: {
      readonly code: ErrorCode;
      readonly message: string;
      readonly retry_after_ms?: number;
    };
  };

/**
 * The text the original deployment answered a full queue with; its clients look for it, also
 * when the memory for payloads is what is full.
 */
export const OVERLOADED_TEXT = "Server is overloaded. Please try again in a moment.";

/**
 * Encodes a reply in the request's style, or returns undefined when that style
 * sends nothing for it (plain-text clients get no deltas). `variant`: the
 * experiment variant that answers the session, named in a JSON `done` or
 * `error` and in a hint (a delta stays short; plain text stays as it was).
 */
export function encodeReply(
  body: ReplyBody,
  style: ReplyStyle,
  sessionId: string,
  requestId: string | undefined,
  variant?: string,
): string | undefined {
  const named = variant !== undefined && body.type !== "delta" ? { variant } : {};
  if (style === "json") {
    return JSON.stringify({
      session_id: sessionId,
      request_id: requestId ?? null,
      ...body,
      ...named,
    });
  }
  if (style === "hint") {
    switch (body.type) {
      case "delta":
        return undefined;
      case "done":
        return JSON.stringify({ ...hintObject(body.response), ...named });
      case "error":
        return JSON.stringify({
          ...errorHint(body.error.code, body.error.message, body.error.retry_after_ms),
          ...named,
        });
    }
  }
  switch (body.type) {
    case "delta":
      return undefined;
    case "done":
      return body.response;
    case "error":
      return body.error.code === "queue_full" || body.error.code === "overloaded"
        ? OVERLOADED_TEXT
        : `Error: ${body.error.message}`;
  }
}
