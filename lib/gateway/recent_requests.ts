/**
 * Remembers recently seen requests (by `request_id`, or by their bytes), so
 * that a repeat (a QoS 1 redelivery, a client's retry) is not generated twice:
 * while the first is running the repeat is dropped, and after it finished its
 * answer can be sent again.
 *
 * @module
 */

import type { ReplyBody } from "../protocol/reply.ts";

interface Entry {
  readonly seenAt: number;
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
   * The clock, in milliseconds.
   * @default {Date.now}
   */
  readonly now?: () => number;
}

/** A window of recently seen request ids, bounded in time and in number. */
export class RecentRequests {
  readonly #windowMs: number;
  readonly #maxEntries: number;
  readonly #now: () => number;
  readonly #entries = new Map<string, Entry>();

  /** @param windowMs How long a request is remembered; 0 turns the window off. */
  constructor(windowMs: number, options: RecentRequestsOptions = {}) {
    this.#windowMs = windowMs;
    this.#maxEntries = options.maxEntries ?? 100_000;
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
    this.#entries.delete(key);
    this.#entries.set(key, { seenAt: now, answer: undefined });
    this.#prune(now);
    return { kind: "new" };
  }

  /**
   * Records `key` as seen now, without asking whether it was seen before: for
   * a request whose repeat is legitimate (the same text sent again) unless it
   * comes flagged as a redelivery, which is then {@linkcode check}ed.
   */
  record(key: string): Repeat {
    if (this.#windowMs === 0) return { kind: "new" };
    const now = this.#now();
    this.#entries.delete(key);
    this.#entries.set(key, { seenAt: now, answer: undefined });
    this.#prune(now);
    return { kind: "new" };
  }

  /** Keeps the final answer of `key` to send again on a repeat. */
  answered(key: string, answer: ReplyBody): void {
    const entry = this.#entries.get(key);
    if (entry) entry.answer = answer;
  }

  /** Forgets `key`: a request that failed may be retried under the same id. */
  forget(key: string): void {
    this.#entries.delete(key);
  }

  #prune(now: number): void {
    for (const [key, entry] of this.#entries) {
      if (this.#entries.size <= this.#maxEntries && now - entry.seenAt < this.#windowMs) break;
      this.#entries.delete(key);
    }
  }
}
