/**
 * The protocol's error codes and the one error class that carries them, so a
 * failure anywhere (parsing, queueing, the engine) reaches the client as
 * `{"type":"error","error":{"code":...}}` without string matching on messages;
 * the one conversion of anything thrown into it, and its form between threads.
 *
 * @module
 */

/** Error codes of protocol v1, as clients see them. */
export type ErrorCode =
  | "invalid_request"
  | "payload_too_large"
  | "unknown_project"
  | "queue_full"
  /** The payloads in flight hold the memory budget (`--payload-memory`): retry later. */
  | "overloaded"
  | "rate_limited"
  | "context_overflow"
  | "engine_unavailable"
  /** The session store cannot be written (a full disk): nothing was generated or saved. */
  | "storage_unavailable"
  | "timeout"
  | "cancelled"
  | "not_found"
  | "forbidden"
  /** The answer is larger than the broker takes, in a reply style that cannot split it. */
  | "reply_too_large"
  | "internal";

/** A failure with a protocol error code, answered to the client that caused it. */
export class ServiceError extends Error {
  readonly code: ErrorCode;
  /** When set, the client may retry after this many milliseconds. */
  readonly retryAfterMs: number | undefined;

  constructor(
    code: ErrorCode,
    message: string,
    options?: { retryAfterMs?: number; cause?: unknown },
  ) {
    super(message, { cause: options?.cause });
    this.name = "ServiceError";
    this.code = code;
    this.retryAfterMs = options?.retryAfterMs;
  }
}

/**
 * Any thrown value as a {@linkcode ServiceError}: the one conversion the
 * gateway and both pools use, so a failure reads the same from any of them.
 * A `ServiceError` is itself; anything else is `internal`, its message kept.
 */
export function asServiceError(error: unknown): ServiceError {
  if (error instanceof ServiceError) return error;
  const message = error instanceof Error ? error.message : String(error);
  return new ServiceError("internal", `internal error: ${message}`, { cause: error });
}

/**
 * A {@linkcode ServiceError} as it crosses between threads (a structured
 * clone keeps neither its class nor its cause): what the client is told.
 */
export interface WireError {
  readonly code: ErrorCode;
  readonly message: string;
  /** Present only when the error carries a retry hint. */
  readonly retryAfterMs?: number;
}

/** `error`'s {@linkcode WireError}: its code, message and retry hint, nothing else. */
export function toWire(error: ServiceError): WireError {
  const { code, message, retryAfterMs } = error;
  return retryAfterMs === undefined ? { code, message } : { code, message, retryAfterMs };
}

/** The {@linkcode ServiceError} a {@linkcode WireError} stands for. */
export function fromWire(wire: WireError): ServiceError {
  return new ServiceError(wire.code, wire.message, { retryAfterMs: wire.retryAfterMs });
}
