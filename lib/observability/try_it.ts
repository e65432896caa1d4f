/**
 * The live page's "try it" panel: a message sent through the gateway's
 * in-process entry under a session id of the page's own (`dashboard-…`, never
 * a client's), its answer streamed back to that page alone as lines of JSON,
 * the reply bodies an MQTT client would get.
 *
 * @module
 */

import {
  type ChatRequest,
  parseRequest,
  type ReplyBody,
  type RequestLimits,
} from "../protocol/mod.ts";
import { json, plainText, SECURITY_HEADERS } from "./_util.ts";
import { sameOrigin } from "./request_origin.ts";

/** Session ids the page may use: its own, never a client's. */
export const DASHBOARD_SESSION = /^dashboard-[A-Za-z0-9]{8,40}$/;

/** What "try it" sends a message through. */
export interface TryItSource {
  /**
   * The gateway's in-process entry, once the service serves: runs `request`,
   * calls `deliver` with each reply body, and returns what cancels it.
   */
  ask(
    request: ChatRequest,
    deliver: (body: ReplyBody) => void,
  ): (() => void) | undefined;
  readonly projects: readonly string[];
  readonly limits: RequestLimits;
}

const encoder = new TextEncoder();

/**
 * "Try it": `{"project","session_id","message"}` (and `audio`, a clip the page
 * attached, checked as a client's is) in, lines of reply bodies
 * (`delta`, then `done` or `error`) out, as an MQTT client would get them.
 */
export async function tryIt(request: Request, source: TryItSource): Promise<Response> {
  // A page of another origin may post here (the browser sends no preflight for a form):
  // only JSON from this page's own origin is taken.
  if (!sameOrigin(request)) return plainText("try it takes requests from this page only\n", 403);
  if (!request.headers.get("content-type")?.startsWith("application/json")) {
    return plainText("send JSON: {project, session_id, message}\n", 415);
  }
  let raw: Record<string, unknown>;
  try {
    raw = await request.json();
  } catch {
    return json({ type: "error", error: { code: "invalid_request", message: "bad JSON" } }, 400);
  }
  const { project, session_id: sessionId, message, audio } = raw ?? {};
  if (typeof project !== "string" || !source.projects.includes(project)) {
    return json(
      { type: "error", error: { code: "unknown_project", message: "pick a served project" } },
      400,
    );
  }
  if (typeof sessionId !== "string" || !DASHBOARD_SESSION.test(sessionId)) {
    return json({
      type: "error",
      error: { code: "invalid_request", message: "session_id must be dashboard-xxxxxxxx" },
    }, 400);
  }
  const payload = encoder.encode(JSON.stringify({ session_id: sessionId, message, audio }));
  // The answer comes back on this response, never on a topic: the reply root only bounds a
  // `reply_topic`, which the payload built here does not carry.
  const outcome = parseRequest(payload, project, `${project}/assistant_response/`, source.limits);
  if (!outcome.ok) {
    return json({
      type: "error",
      error: { code: outcome.error.code, message: outcome.error.message },
    }, 400);
  }
  let cancel: (() => void) | undefined;
  let finished = false;
  const body = new ReadableStream<Uint8Array>({
    start: (controller) => {
      const deliver = (reply: ReplyBody) => {
        if (finished) return;
        try {
          controller.enqueue(encoder.encode(JSON.stringify(reply) + "\n"));
          if (reply.type !== "delta") {
            finished = true;
            controller.close();
          }
        } catch { /* the page went away */ }
      };
      cancel = source.ask(outcome.request, deliver);
      if (cancel === undefined) {
        deliver({
          type: "error",
          error: { code: "engine_unavailable", message: "the service is starting" },
        });
      }
    },
    cancel: () => {
      if (!finished) cancel?.();
      finished = true;
    },
  });
  return new Response(body, {
    headers: {
      "content-type": "application/x-ndjson; charset=utf-8",
      "cache-control": "no-store",
      ...SECURITY_HEADERS,
    },
  });
}
