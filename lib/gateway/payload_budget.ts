/**
 * The memory budget of payloads in flight (`--payload-memory`): what a
 * request costs the heap from the moment it is parsed until its turn is
 * answered. A payload is charged before it is parsed, by its shape (see
 * `protocol/json_shape.ts`): its text and the arrays and objects `JSON.parse`
 * would build. Once parsed, only what the request keeps stays charged (its
 * message, system prompt, images and audio, held on the gateway's thread and again
 * on its worker's) until the turn is answered or refused. A payload that does
 * not fit now is refused with `overloaded` and a retry hint; one that could
 * never fit, with `payload_too_large`. So big or deeply structured payloads
 * wait their turn at the client instead of growing the heap without bound.
 *
 * @module
 */

import {
  type ChatRequest,
  type JsonShape,
  jsonShape,
  MAX_JSON_DEPTH,
  type ParseOutcome,
  payloadAddress,
  type ReplyAddress,
  ServiceError,
} from "../protocol/mod.ts";

/**
 * Heap bytes `JSON.parse` takes per array or object: a V8 object or array
 * with its backing store (measured: three million one-element arrays take
 * about 160 MB).
 */
const BYTES_PER_CONTAINER = 64;

/** Milliseconds a client refused for memory is told to wait: about the time a turn takes. */
const OVERLOADED_RETRY_MS = 1000;

/** Memory held for one payload or request, given back once. */
export interface Reservation {
  /** Bytes held. */
  readonly bytes: number;
  /** Gives the bytes back; again: nothing. */
  release(): void;
}

/** Why a charge was refused: it does not fit now, or it never can. */
type Refusal = { readonly kind: "busy" | "too_large"; readonly bytes: number };

/** A parsed request, with the memory its turn holds until it is answered or refused. */
export type BudgetedOutcome =
  | { ok: true; request: ChatRequest; memory: Reservation }
  | { ok: false; error: ServiceError; address: ReplyAddress | undefined };

/** Bytes of heap payloads in flight may hold; 0 turns the budget off. */
export class PayloadBudget {
  readonly #limitBytes: number;
  #held = 0;

  constructor(limitBytes: number) {
    this.#limitBytes = limitBytes;
  }

  /** Holds `bytes`, or says why not: over what is left now, or over the whole budget. */
  reserve(bytes: number): Reservation | Refusal {
    if (this.#limitBytes > 0) {
      if (bytes > this.#limitBytes) return { kind: "too_large", bytes };
      if (this.#held + bytes > this.#limitBytes) return { kind: "busy", bytes };
    }
    this.#held += bytes;
    let held = true;
    return {
      bytes,
      release: () => {
        if (!held) return;
        held = false;
        this.#held -= bytes;
      },
    };
  }

  /**
   * Parses a request payload within the budget: `parse` runs only if the
   * payload's parse cost fits now, and the request it yields keeps its own
   * cost (`memory`, to release when its turn ends). A payload over
   * `maxPayloadBytes` or nested too deep costs nothing: `parse` refuses it
   * before it decodes anything. `parse` is told whether the payload was
   * found within those limits here (`judged`), so as not to judge it again.
   */
  parse(
    payload: Uint8Array,
    maxPayloadBytes: number,
    parse: (judged: boolean) => ParseOutcome,
  ): BudgetedOutcome {
    const shape = payload.byteLength > maxPayloadBytes
      ? undefined
      : jsonShape(payload, MAX_JSON_DEPTH);
    const judged = shape !== undefined && shape.depth <= MAX_JSON_DEPTH;
    const cost = judged ? parseCost(payload, shape) : 0;
    const parsing = this.reserve(cost);
    if (!("release" in parsing)) {
      const address = payloadAddress(payload);
      return { ok: false, error: this.#refusal(parsing, shape), address };
    }
    let outcome: ParseOutcome;
    try {
      outcome = parse(judged);
    } finally {
      parsing.release();
    }
    if (!outcome.ok) return outcome;
    const memory = this.reserve(requestCost(outcome.request));
    if (!("release" in memory)) {
      return { ok: false, error: this.#refusal(memory), address: outcome.request };
    }
    return { ...outcome, memory };
  }

  #refusal(refusal: Refusal, shape?: JsonShape): ServiceError {
    const budget = `the ${megabytes(this.#limitBytes)} of --payload-memory`;
    const structure = shape && shape.containers > 1
      ? ` (${shape.containers.toLocaleString("en-US")} arrays and objects)`
      : "";
    if (refusal.kind === "too_large") {
      return new ServiceError(
        "payload_too_large",
        `payload would take about ${megabytes(refusal.bytes)} of memory${structure}, ` +
          `more than ${budget}`,
      );
    }
    return new ServiceError(
      "overloaded",
      `requests in flight hold ${megabytes(this.#held)} of ${budget}; this one needs about ` +
        `${megabytes(refusal.bytes)}${structure}: retry later`,
      { retryAfterMs: OVERLOADED_RETRY_MS },
    );
  }
}

/**
 * The heap a payload of this shape takes while it is parsed: its text
 * decoded (up to two bytes a character), the strings parsed out of it (at
 * most its size) and every array and object.
 */
function parseCost(payload: Uint8Array, shape: JsonShape): number {
  return 3 * payload.byteLength + BYTES_PER_CONTAINER * shape.containers;
}

/**
 * The heap a parsed request keeps until its turn is answered: its texts,
 * images and audio clips, twice (the gateway's copy and its worker's).
 */
function requestCost(request: ChatRequest): number {
  let bytes = 2 * ((request.message?.length ?? 0) + (request.systemPrompt?.length ?? 0));
  for (const image of request.images ?? []) bytes += image.url.length;
  for (const clip of request.audio ?? []) bytes += clip.url.length;
  return 2 * bytes;
}

/** A size for people: 5.8 MB. */
function megabytes(bytes: number): string {
  return `${(bytes / 1_000_000).toFixed(1)} MB`;
}
