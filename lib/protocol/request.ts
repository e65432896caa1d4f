/**
 * Parsing and validation of a request payload: protocol v1, and the original
 * deployment's camelCase form, read as v1 fields first ({@linkcode v1Fields}).
 * Runs on the gateway thread for every message, so it checks the size and
 * the nesting before it decodes, and decodes before it parses.
 *
 * @module
 */

import { z } from "zod";
import { ServiceError } from "./errors.ts";
import { type AudioInput, parseAudio } from "./audio.ts";
import { type ImageInput, parseImages } from "./images.ts";
import { jsonShape, MAX_JSON_DEPTH } from "./json_shape.ts";
import { generatedSessionId, v1Fields } from "./request_fields.ts";
import { type ReplyStyle, replyStyle } from "./reply_style.ts";
import { SESSION_ID_PATTERN, SESSION_ID_RULE } from "./topics.ts";

/** Sampling parameters a client may set, after clamping. */
export interface SamplingParams {
  readonly max_tokens: number;
  readonly temperature: number;
  readonly top_p: number;
  readonly top_k?: number;
  readonly stop?: readonly string[];
  readonly seed?: number;
}

/** A validated request. */
export interface ChatRequest {
  readonly project: string;
  readonly sessionId: string;
  readonly requestId: string | undefined;
  /** The user's text (empty when only images came); undefined for a bare `reset` or `cancel`. */
  readonly message: string | undefined;
  /** Images shown with the message, checked (see `images.ts`); absent: none. */
  readonly images?: readonly ImageInput[];
  /** Audio clips spoken with the message, checked (see `audio.ts`); absent: none. */
  readonly audio?: readonly AudioInput[];
  readonly priority: number;
  readonly stream: boolean;
  readonly params: SamplingParams;
  readonly reset: boolean;
  readonly cancel: boolean;
  readonly style: ReplyStyle;
  /** A per-request system prompt replacing the project's (the original's `systemPrompt`). */
  readonly systemPrompt: string | undefined;
  /**
   * The reply topic the payload names (the original's `replyTopic`), taken
   * only where the requester may read it (see `gateway/reply_target.ts`).
   */
  readonly replyTopic: string | undefined;
  readonly clientId: string | undefined;
  /** The experiment variant the request asks to be answered by (projects that allow it). */
  readonly variant?: string;
}

/** The limits and defaults requests are checked and clamped against. */
export interface RequestLimits {
  readonly maxPayloadBytes: number;
  readonly maxMessageChars: number;
  readonly maxPriority: number;
  /** The default of `max_tokens`. */
  readonly maxTokens: number;
  /**
   * The operator's upper bound of `max_tokens`; 0 or absent: none but the
   * model's context (the worker fits the answer into what the prompt leaves).
   */
  readonly maxTokensCap?: number;
  /** The model's context length, the largest `max_tokens` without a cap. */
  readonly maxModelLen?: number;
  readonly temperature: number;
  readonly topP: number;
  readonly stream: boolean;
  /** Images per request (`--max-images`); 0 or absent: none taken. */
  readonly maxImages?: number;
  /** Decoded bytes per image (`--max-image-bytes`). */
  readonly maxImageBytes?: number;
  /** Whether remote http(s) image URLs are passed on (`--remote-images`). */
  readonly remoteImages?: boolean;
  /** Audio clips per request (`--max-audio-clips`); 0 or absent: none taken. */
  readonly maxAudioClips?: number;
  /** Decoded bytes per clip (`--max-audio-bytes`). */
  readonly maxAudioBytes?: number;
  /** Milliseconds of audio per request, all clips together (`--max-audio-duration`). */
  readonly maxAudioMs?: number;
}

/** Where an invalid request can still be answered. */
export interface ReplyAddress {
  readonly sessionId: string;
  readonly requestId: string | undefined;
  readonly style: ReplyStyle;
  readonly replyTopic: string | undefined;
}

/** The outcome of parsing: a request, or an error with the address to answer it at, if any. */
export type ParseOutcome =
  | { ok: true; request: ChatRequest }
  | { ok: false; error: ServiceError; address: ReplyAddress | undefined };

const shortString = z.string().max(256);

const paramsSchema = z.object({
  max_tokens: z.number().int().optional(),
  temperature: z.number().optional(),
  top_p: z.number().optional(),
  top_k: z.number().int().optional(),
  stop: z.union([z.string().max(64), z.array(z.string().max(64)).max(4)]).optional(),
  seed: z.number().int().optional(),
}).strict();

const requestSchema = z.object({
  session_id: z.string().regex(SESSION_ID_PATTERN, { message: SESSION_ID_RULE }),
  message: z.string().optional(),
  request_id: shortString.optional(),
  priority: z.number().int().optional(),
  stream: z.boolean().optional(),
  params: paramsSchema.optional(),
  reset: z.boolean().optional(),
  cancel: z.boolean().optional(),
  format: z.enum(["json", "text"]).optional(),
  system_prompt: z.string().max(32_768).optional(),
  reply_topic: z.string().max(512).optional(),
  client_id: shortString.optional(),
  // Taken only where the project allows it (`allow_variant_request`); checked by the gateway.
  variant: z.string().max(32).optional(),
  // Checked on their own (`images.ts`), to name the bad image and why.
  images: z.unknown().optional(),
  // Checked on their own (`audio.ts`), to name the bad clip and why.
  audio: z.unknown().optional(),
});

const DECODER = new TextDecoder("utf-8", { fatal: true });

const clamp = (value: number, low: number, high: number) => Math.min(high, Math.max(low, value));

/**
 * Parses one request payload published on `{project}/user_input`.
 *
 * @param payload The raw MQTT payload.
 * @param project The (enabled) project whose input topic it came on.
 * @param responseRoot The project's `.../assistant_response/` topic: a request that names no
 *   session but a `replyTopic` below it is that reply topic's session.
 * @param topicSessionId The session a per-session input topic names: the payload's own must match.
 * @param judged Whether the payload is known to be within the size and nesting limits already
 *   (the memory budget judges it before parsing): it is not judged again.
 */
export function parseRequest(
  payload: Uint8Array,
  project: string,
  responseRoot: string,
  limits: RequestLimits,
  topicSessionId?: string,
  judged = false,
): ParseOutcome {
  const fail = (
    message: string,
    address?: ReplyAddress,
    code: "invalid_request" | "payload_too_large" | "forbidden" = "invalid_request",
  ): ParseOutcome => ({
    ok: false,
    error: new ServiceError(code, message),
    address,
  });

  const unparsable = judged ? undefined : unparsableReason(payload, limits.maxPayloadBytes);
  if (unparsable) {
    return { ok: false, error: unparsable, address: payloadAddress(payload) };
  }
  let raw: unknown;
  try {
    raw = JSON.parse(DECODER.decode(payload));
  } catch (error) {
    const why = error instanceof TypeError ? "not valid UTF-8" : "not valid JSON";
    return fail(`payload is ${why}`);
  }
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
    return fail("payload must be a JSON object");
  }

  const { fields, camelCase } = v1Fields(raw);
  // On a session's own input topic the payload may leave the id out; one it names must match.
  if (
    topicSessionId !== undefined && fields.session_id !== undefined &&
    fields.session_id !== topicSessionId
  ) {
    return fail(
      `the payload names session ${JSON.stringify(fields.session_id)}, but this topic is ` +
        `session ${topicSessionId}'s`,
      {
        sessionId: topicSessionId,
        requestId: typeof fields.request_id === "string"
          ? fields.request_id.slice(0, 256)
          : undefined,
        // The payload's `format` is not read here: the style follows its form alone.
        style: replyStyle(undefined, camelCase),
        replyTopic: undefined,
      },
      "forbidden",
    );
  }
  // A request without a session id is the session of the reply topic it names (where its
  // client reads), else a conversation of its own, as the original made it.
  fields.session_id ??= topicSessionId ?? replyTopicSession(fields.reply_topic, responseRoot) ??
    generatedSessionId();

  const parsed = requestSchema.safeParse(fields);
  if (!parsed.success) {
    const sessionId = fields.session_id;
    // A session id that cannot be a topic level has no topic its client may read: the
    // request is only counted.
    const addressable = typeof sessionId === "string" && SESSION_ID_PATTERN.test(sessionId);
    const address = addressable
      ? {
        sessionId,
        requestId: typeof fields.request_id === "string"
          ? fields.request_id.slice(0, 256)
          : undefined,
        style: replyStyle(fields.format, camelCase),
        replyTopic: replyTopicField(fields.reply_topic),
      }
      : undefined;
    const issue = parsed.error.issues[0];
    const where = issue.path.length > 0 ? `'${issue.path.join(".")}': ` : "";
    return fail(`${where}${issue.message}`, address);
  }

  const body = parsed.data;
  const address: ReplyAddress = {
    sessionId: body.session_id,
    requestId: body.request_id,
    style: replyStyle(body.format, camelCase),
    replyTopic: replyTopicField(body.reply_topic),
  };
  const reset = body.reset ?? false;
  const cancel = body.cancel ?? false;
  const checked = parseImages(body.images, {
    maxImages: limits.maxImages ?? 0,
    maxImageBytes: limits.maxImageBytes ?? 0,
    remoteImages: limits.remoteImages ?? false,
  });
  if (!checked.ok) return fail(checked.message, address);
  const images = checked.images.length > 0 ? checked.images : undefined;
  const heard = parseAudio(body.audio, {
    maxAudioClips: limits.maxAudioClips ?? 0,
    maxAudioBytes: limits.maxAudioBytes ?? 0,
    maxAudioMs: limits.maxAudioMs ?? 0,
  });
  if (!heard.ok) return fail(heard.message, address);
  const audio = heard.audio.length > 0 ? heard.audio : undefined;
  // Images or audio alone are a message (the OwOGPT client sends images without text).
  if ((images || audio) && body.message === undefined) body.message = "";
  if (body.message === undefined && !reset && !cancel) {
    return fail("'message' is required unless 'reset' or 'cancel' is set", address);
  }
  if (body.message !== undefined && body.message.length > limits.maxMessageChars) {
    return fail(
      `'message' is ${body.message.length} characters, more than the limit of ${limits.maxMessageChars}`,
      address,
    );
  }
  if (body.message !== undefined && body.message.trim() === "" && !reset && !images && !audio) {
    return fail("'message' is empty", address);
  }

  const p = body.params ?? {};
  const params: SamplingParams = {
    // The client's value, as the original passed it on; the worker bounds it by the context.
    max_tokens: clamp(
      p.max_tokens ?? limits.maxTokens,
      1,
      limits.maxTokensCap || (limits.maxModelLen ?? limits.maxTokens + 1) - 1,
    ),
    temperature: clamp(p.temperature ?? limits.temperature, 0, 2),
    top_p: p.top_p === undefined ? limits.topP : clamp(p.top_p, 0.01, 1),
    ...(p.top_k !== undefined && { top_k: clamp(p.top_k, -1, 1000) }),
    ...(p.stop !== undefined && { stop: typeof p.stop === "string" ? [p.stop] : p.stop }),
    ...(p.seed !== undefined && { seed: p.seed }),
  };

  return {
    ok: true,
    request: {
      project,
      sessionId: body.session_id,
      requestId: body.request_id,
      message: body.message,
      ...(images && { images }),
      ...(audio && { audio }),
      priority: clamp(body.priority ?? 0, -limits.maxPriority, limits.maxPriority),
      stream: address.style === "json" && (body.stream ?? limits.stream),
      params,
      reset,
      cancel,
      style: address.style,
      systemPrompt: body.system_prompt,
      replyTopic: address.replyTopic,
      clientId: body.client_id,
      ...(body.variant !== undefined && { variant: body.variant }),
    },
  };
}

/**
 * Why a JSON payload is not even decoded: it is over `maxPayloadBytes`, or
 * nests arrays and objects more than {@linkcode MAX_JSON_DEPTH} levels deep
 * (each level is an array or object on the heap: three million of them fit
 * in 6 MB). Undefined: it may be parsed.
 */
export function unparsableReason(
  payload: Uint8Array,
  maxPayloadBytes: number,
): ServiceError | undefined {
  if (payload.byteLength > maxPayloadBytes) {
    return new ServiceError(
      "payload_too_large",
      `payload is ${payload.byteLength} bytes, more than the limit of ${maxPayloadBytes}`,
    );
  }
  if (jsonShape(payload, MAX_JSON_DEPTH).depth > MAX_JSON_DEPTH) {
    return new ServiceError(
      "invalid_request",
      `payload nests arrays and objects more than ${MAX_JSON_DEPTH} levels deep`,
    );
  }
  return undefined;
}

/** A string field of a JSON text, found without parsing it: `"name": "value"`. */
function peekField(text: string, names: readonly string[]): string | undefined {
  for (const name of names) {
    const found = new RegExp(`"${name}"\\s*:\\s*"((?:[^"\\\\]|\\\\.){0,512})"`).exec(text);
    if (found) {
      try {
        return JSON.parse(`"${found[1]}"`);
      } catch { /* not a JSON string after all */ }
    }
  }
  return undefined;
}

/**
 * Where to answer a payload that is not parsed (too large, too deep, no room
 * for it now): its session id (and request id, reply style, reply topic),
 * read from the text without parsing the whole.
 */
export function payloadAddress(payload: Uint8Array): ReplyAddress | undefined {
  const text = new TextDecoder().decode(payload);
  const sessionId = peekField(text, ["session_id", "sessionId"]);
  if (sessionId === undefined || !SESSION_ID_PATTERN.test(sessionId)) return undefined;
  const format = peekField(text, ["format"]);
  return {
    sessionId,
    requestId: peekField(text, ["request_id", "requestId"])?.slice(0, 256),
    // Read without parsing, the original's form is a payload without a `session_id`.
    style: replyStyle(format, peekField(text, ["session_id"]) === undefined),
    replyTopic: replyTopicField(peekField(text, ["reply_topic", "replyTopic"])),
  };
}

/**
 * The reply topic a payload names, as given: whether its client may read it
 * is the gateway's to decide (`reply_target.ts`), which refuses it if not.
 */
function replyTopicField(value: unknown): string | undefined {
  return typeof value === "string" ? value.slice(0, 512) : undefined;
}

/** The session whose reply topic (or a topic below it) `value` is, if it is one. */
function replyTopicSession(value: unknown, responseRoot: string): string | undefined {
  if (typeof value !== "string" || !value.startsWith(responseRoot)) return undefined;
  const level = value.slice(responseRoot.length).split("/")[0];
  return SESSION_ID_PATTERN.test(level) ? level : undefined;
}
