/**
 * Remembers recently seen requests (by `request_id`, or by their bytes), so
 * that a repeat (a QoS 1 redelivery, a client's retry) is not generated twice:
 * while the first is running the repeat is dropped, and after it finished its
 * answer can be sent again. Bounded in time, in number and in the bytes its
 * answers take; a retry of a request forgotten early is answered from the
 * session's history by the worker (it stores the `request_id` with the turn).
 *
 * @module
 */

import type { ReplyBody } from "../protocol/reply.ts";

interface Entry {
  readonly seenAt: number;
  /** What it takes of the heap, its answer included: counted against `maxBytes`. */
  bytes: number;
  /** The final answer, once there is one. */
  answer: ReplyBody | undefined;
}

/** What to do with a request that carries a `request_id`. */
export type Repeat =
  | { readonly kind: "new" }
  | { readonly kind: "running" }
  | { readonly kind: "answered"; readonly answer: ReplyBody };

/** Options of {@linkcode RecentRequests}. */
export interface RecentRequestsOptions {
  /**
   * Requests remembered at most; the oldest are forgotten first.
   * @default {100000}
   */
  readonly maxEntries?: number;
  /**
   * Bytes the requests remembered and their answers may take (about two a
   * character); the oldest are forgotten first.
   * @default {33554432}
   */
  readonly maxBytes?: number;
  /**
   * The clock, in milliseconds.
   * @default {Date.now}
   */
  readonly now?: () => number;
}

/** A window of recently seen request ids, bounded in time and in number. */
export class RecentRequests {
  readonly #windowMs: number;
  readonly #maxEntries: number;
  readonly #maxBytes: number;
  readonly #now: () => number;
  readonly #entries = new Map<string, Entry>();
  #bytes = 0;

  /** @param windowMs How long a request is remembered; 0 turns the window off. */
  constructor(windowMs: number, options: RecentRequestsOptions = {}) {
    this.#windowMs = windowMs;
    this.#maxEntries = options.maxEntries ?? 100_000;
    this.#maxBytes = options.maxBytes ?? 32 * 1024 * 1024;
    this.#now = options.now ?? Date.now;
  }

  /** Records `key` as seen, unless it is a repeat within the window. */
  check(key: string): Repeat {
    if (this.#windowMs === 0) return { kind: "new" };
    const now = this.#now();
    const entry = this.#entries.get(key);
    if (entry && now - entry.seenAt < this.#windowMs) {
      return entry.answer ? { kind: "answered", answer: entry.answer } : { kind: "running" };
    }
    this.#add(key, now);
    return { kind: "new" };
  }

  /**
   * Records `key` as seen now, without asking whether it was seen before: for
   * a request whose repeat is legitimate (the same text sent again) unless it
   * comes flagged as a redelivery, which is then {@linkcode check}ed.
   */
  record(key: string): Repeat {
    if (this.#windowMs === 0) return { kind: "new" };
    this.#add(key, this.#now());
    return { kind: "new" };
  }

  /** Keeps the final answer of `key` to send again on a repeat. */
  answered(key: string, answer: ReplyBody): void {
    const entry = this.#entries.get(key);
    if (!entry) return;
    entry.answer = answer;
    const bytes = answerBytes(answer);
    entry.bytes += bytes;
    this.#bytes += bytes;
    this.#prune(this.#now());
  }

  /** Forgets `key`: a request that failed may be retried under the same id. */
  forget(key: string): void {
    this.#delete(key);
  }

  /** Requests remembered now. */
  get size(): number {
    return this.#entries.size;
  }

  /** Bytes the requests remembered now and their answers take (about two a character). */
  get bytes(): number {
    return this.#bytes;
  }

  /** Forgets what the window has passed, while no request comes to do it. */
  sweep(): void {
    this.#prune(this.#now());
  }

  #add(key: string, now: number): void {
    this.#delete(key);
    const bytes = ENTRY_BYTES + 2 * key.length;
    this.#entries.set(key, { seenAt: now, bytes, answer: undefined });
    this.#bytes += bytes;
    this.#prune(now);
  }

  #delete(key: string): void {
    const entry = this.#entries.get(key);
    if (!entry) return;
    this.#entries.delete(key);
    this.#bytes -= entry.bytes;
  }

  /** Forgets the oldest entries while there are too many, or they are too old or too big. */
  #prune(now: number): void {
    for (const [key, entry] of this.#entries) {
      if (
        this.#entries.size <= this.#maxEntries && this.#bytes <= this.#maxBytes &&
        now - entry.seenAt < this.#windowMs
      ) break;
      this.#delete(key);
    }
  }
}

/** The heap an entry takes besides its key and answer (measured: about 150 bytes). */
const ENTRY_BYTES = 150;

/** The heap an answer takes: its text, and about 250 bytes of objects around it. */
function answerBytes(answer: ReplyBody): number {
  return 250 + 2 * (answer.type === "done" ? answer.response.length : 0);
}
