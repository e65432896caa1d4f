/**
 * Token buckets, one per key (a session, a client id): each holds up to
 * `burst` requests and refills at `perMinute`. A request that finds its
 * bucket empty is told when the next token arrives.
 *
 * @module
 */

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
   * Buckets kept before full ones (idle keys) are dropped.
   * @default {100000}
   */
  readonly maxKeys?: number;
}

interface Bucket {
  tokens: number;
  at: number;
}

/** Per-key token buckets. */
export class RateLimiter {
  readonly #perMs: number;
  readonly #burst: number;
  readonly #maxKeys: number;
  readonly #buckets = new Map<string, Bucket>();

  constructor(options: RateLimiterOptions) {
    this.#perMs = options.perMinute / 60_000;
    this.#burst = options.burst ?? 10;
    this.#maxKeys = options.maxKeys ?? 100_000;
  }

  /**
   * Takes a token for `key`. Returns 0 when the request may go ahead, else
   * the milliseconds until it may be retried.
   */
  take(key: string, now = performance.now()): number {
    if (this.#perMs === 0) return 0;
    const bucket = this.#buckets.get(key) ?? { tokens: this.#burst, at: now };
    bucket.tokens = Math.min(this.#burst, bucket.tokens + (now - bucket.at) * this.#perMs);
    bucket.at = now;
    this.#buckets.delete(key); // re-inserted last: the map stays in least recently used order
    this.#buckets.set(key, bucket);
    if (this.#buckets.size > this.#maxKeys) this.#forgetOldest();
    if (bucket.tokens >= 1) {
      bucket.tokens -= 1;
      return 0;
    }
    return Math.ceil((1 - bucket.tokens) / this.#perMs);
  }

  #forgetOldest(): void {
    for (const key of this.#buckets.keys()) {
      if (this.#buckets.size <= this.#maxKeys) return;
      this.#buckets.delete(key);
    }
  }
}
