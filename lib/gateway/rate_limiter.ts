/**
 * Token buckets, one per key (a session, a client id): each holds up to
 * `burst` requests and refills at `perMinute`. A request that finds its
 * bucket empty is told when the next token arrives. A bucket that has filled
 * up again is no different from a new one, and is dropped: a burst of new
 * sessions leaves no buckets behind once each has been idle long enough to
 * get back what it gave (a second per request at 60 a minute).
 *
 * @module
 */

import { LruMap } from "../_util.ts";

/** Options of {@linkcode RateLimiter}. */
export interface RateLimiterOptions {
  /** Requests per minute per key; 0 turns the limiter off. */
  readonly perMinute: number;
  /**
   * Requests a key may send at once before the rate applies.
   * @default {10}
   */
  readonly burst?: number;
  /**
   * Buckets kept at most: beyond it the least recently used is dropped, full or not.
   * @default {100000}
   */
  readonly maxKeys?: number;
  /**
   * The clock, in milliseconds.
   * @default {performance.now}
   */
  readonly now?: () => number;
}

interface Bucket {
  tokens: number;
  at: number;
}

/** Per-key token buckets. */
export class RateLimiter {
  readonly #perMs: number;
  readonly #burst: number;
  readonly #buckets: LruMap<string, Bucket>;
  readonly #now: () => number;

  constructor(options: RateLimiterOptions) {
    this.#perMs = options.perMinute / 60_000;
    this.#burst = options.burst ?? 10;
    this.#buckets = new LruMap(options.maxKeys ?? 100_000);
    this.#now = options.now ?? (() => performance.now());
  }

  /**
   * Takes a token for `key`. Returns 0 when the request may go ahead, else
   * the milliseconds until it may be retried.
   */
  take(key: string): number {
    if (this.#perMs === 0) return 0;
    const now = this.#now();
    this.#dropFull(now);
    const bucket = this.#buckets.get(key) ?? { tokens: this.#burst, at: now };
    bucket.tokens = Math.min(this.#burst, bucket.tokens + (now - bucket.at) * this.#perMs);
    bucket.at = now;
    this.#buckets.set(key, bucket);
    if (bucket.tokens >= 1) {
      bucket.tokens -= 1;
      return 0;
    }
    return Math.ceil((1 - bucket.tokens) / this.#perMs);
  }

  /** Buckets kept now (those not full again yet). */
  get size(): number {
    this.sweep();
    return this.#buckets.size;
  }

  /** Drops the buckets that have filled up again, while no request comes to do it. */
  sweep(): void {
    this.#dropFull(this.#now());
  }

  /**
   * Drops full buckets, least recently used first, up to the first that is
   * not full yet: the later ones were used since, so mostly not full either.
   */
  #dropFull(now: number): void {
    for (const [key, bucket] of this.#buckets) {
      if (bucket.tokens + (now - bucket.at) * this.#perMs < this.#burst) return;
      this.#buckets.delete(key);
    }
  }
}
