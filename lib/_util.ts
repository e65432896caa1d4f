/**
 * Small helpers shared by several modules. Private to `lib/`.
 *
 * @module
 */

/**
 * FNV-1a (32 bits) over the UTF-16 code units of `text`, mixed by MurmurHash3's
 * finaliser so that texts that differ in their last character land far apart.
 */
export function mixedHash32(text: string): number {
  let hash = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    hash ^= text.charCodeAt(i);
    hash = Math.imul(hash, 0x01000193);
  }
  hash ^= hash >>> 16;
  hash = Math.imul(hash, 0x85ebca6b);
  hash ^= hash >>> 13;
  hash = Math.imul(hash, 0xc2b2ae35);
  hash ^= hash >>> 16;
  return hash >>> 0;
}

/** The nearest-rank percentile `q` (0 to 1) of `values`, rounded; null when there are none. */
export function percentile(values: readonly number[], q: number): number | null {
  if (values.length === 0) return null;
  const sorted = values.toSorted((a, b) => a - b);
  return Math.round(sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]);
}

/** Resolves after `ms`, or rejects with the signal's reason when it aborts first. */
export function abortableSleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal!.reason);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** `promise`, or a rejection once `ms` milliseconds have passed. */
export function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** How {@linkcode backoffDelay} grows and spreads its delays. */
export interface BackoffOptions {
  /** The delay before the first retry, in milliseconds. */
  readonly firstMs: number;
  /**
   * The longest delay before jitter, in milliseconds.
   *
   * @default {Infinity}
   */
  readonly maxMs?: number;
  /**
   * How the delay is spread, so that many clients retrying at once do not retry in step:
   * `"half"` scales it by a random factor in [0.5, 1.5); `"full"` picks any delay from
   * `firstMs` up to it; `"none"` keeps it exact (one process retrying alone).
   *
   * @default {"half"}
   */
  readonly jitter?: "half" | "full" | "none";
}

/**
 * The delay before retry number `attempt` (0 for the first retry): doubling from `firstMs`
 * up to `maxMs`, then spread as `jitter` says.
 */
export function backoffDelay(attempt: number, options: BackoffOptions): number {
  const { firstMs, maxMs = Infinity, jitter = "half" } = options;
  const delay = Math.min(maxMs, firstMs * 2 ** attempt);
  switch (jitter) {
    case "none":
      return delay;
    case "full":
      return Math.max(firstMs, Math.round(Math.random() * delay));
    case "half":
      return delay * (0.5 + Math.random());
  }
}

/**
 * A `Map` that keeps at most `limit` entries, forgetting the least recently used one: `get`
 * and `set` count as a use.
 */
export class LruMap<K, V> extends Map<K, V> {
  readonly #limit: number;

  constructor(limit: number) {
    super();
    if (!Number.isInteger(limit) || limit < 1) {
      throw new RangeError(`LruMap limit must be a positive integer, got ${limit}`);
    }
    this.#limit = limit;
  }

  override get(key: K): V | undefined {
    if (!super.has(key)) return undefined;
    const value = super.get(key) as V;
    super.delete(key);
    super.set(key, value);
    return value;
  }

  override set(key: K, value: V): this {
    super.delete(key);
    super.set(key, value);
    if (this.size > this.#limit) super.delete(super.keys().next().value as K);
    return this;
  }
}

/**
 * A background probe: runs `probe` after each wait of `intervalMs()` (read anew each
 * round, so a circuit breaker can probe more often while its circuit is open) until
 * {@linkcode ProbeLoop.close}. {@linkcode ProbeLoop.wake} cuts the current wait short.
 */
export class ProbeLoop {
  readonly #probe: () => Promise<unknown>;
  readonly #intervalMs: () => number;
  readonly #sleep: (ms: number, signal: AbortSignal) => Promise<void>;
  readonly #stop = new AbortController();
  #wake: AbortController | undefined;
  #running: Promise<void> | undefined;

  /** @param sleep Waits `ms` or until `signal` aborts (rejecting); tests inject their own. */
  constructor(
    probe: () => Promise<unknown>,
    intervalMs: () => number,
    sleep: (ms: number, signal: AbortSignal) => Promise<void> = abortableSleep,
  ) {
    this.#probe = probe;
    this.#intervalMs = intervalMs;
    this.#sleep = sleep;
  }

  /** Aborts when {@linkcode ProbeLoop.close} is called: for a probe's own waits. */
  get signal(): AbortSignal {
    return this.#stop.signal;
  }

  /** Starts the loop (once). */
  start(): void {
    this.#running ??= this.#loop();
  }

  /** Ends the current wait: the next probe runs after a fresh `intervalMs()`. */
  wake(): void {
    this.#wake?.abort();
  }

  /** Stops the loop; resolves once a probe under way has finished. */
  async close(): Promise<void> {
    this.#stop.abort();
    await this.#running;
  }

  async #loop(): Promise<void> {
    while (!this.#stop.signal.aborted) {
      this.#wake = new AbortController();
      try {
        await this.#sleep(
          this.#intervalMs(),
          AbortSignal.any([this.#stop.signal, this.#wake.signal]),
        );
      } catch {
        if (this.#stop.signal.aborted) return;
        continue; // woken: wait again, for the interval as it is now
      }
      await this.#probe();
    }
  }
}

/**
 * The one of `candidates` nearest to `word` by edit distance (letters added,
 * removed or changed), if it is at most `maxDistance` away: the name a typo
 * most likely meant.
 */
export function closest(
  word: string,
  candidates: Iterable<string>,
  maxDistance = 2,
): string | undefined {
  let best: string | undefined;
  let bestDistance = maxDistance + 1;
  for (const candidate of candidates) {
    const distance = editDistance(word, candidate);
    if (distance < bestDistance) [best, bestDistance] = [candidate, distance];
  }
  return best;
}

/** Levenshtein distance, one row at a time. */
function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const row = [i];
    for (let j = 1; j <= b.length; j++) {
      const change = previous[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1);
      row.push(Math.min(change, previous[j] + 1, row[j - 1] + 1));
    }
    previous = row;
  }
  return previous[b.length];
}
