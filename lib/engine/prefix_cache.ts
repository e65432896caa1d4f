/**
 * The simulated engine's model of vLLM's automatic prefix caching: prompts
 * are cut into blocks of 16 tokens, each identified by a hash chained over
 * every token before it, so a block is reused only when the whole prefix up
 * to it is the same. Least recently used blocks are evicted beyond capacity.
 *
 * @module
 */

/** Tokens per block (vLLM's default `--block-size`). */
const BLOCK_TOKENS = 16;

/** A bounded LRU set of prompt-prefix blocks. */
export class PrefixCache {
  readonly #capacity: number;
  // A plain Map, not `LruMap`: blocks met after a prompt's first miss keep their place, and
  // eviction waits until the whole prompt is in; `LruMap` would refresh and evict at each `set`.
  readonly #blocks = new Map<number, true>();
  #queries = 0;
  #hits = 0;

  /** `capacity`: how many blocks fit (the KV cache's size). */
  constructor(capacity: number) {
    this.#capacity = capacity;
  }

  /** Prompt tokens looked up so far (vLLM's `prefix_cache_queries`). */
  get queries(): number {
    return this.#queries;
  }

  /** Prompt tokens found cached so far (vLLM's `prefix_cache_hits`). */
  get hits(): number {
    return this.#hits;
  }

  /**
   * Looks a prompt up, caches its full blocks, and returns how many of its
   * tokens were already cached: the work prefill saves.
   */
  lookup(tokens: readonly number[]): number {
    let hash = 0x811c9dc5;
    let cached = 0;
    let missed = false;
    const full = Math.floor(tokens.length / BLOCK_TOKENS);
    for (let block = 0; block < full; block++) {
      for (let i = block * BLOCK_TOKENS; i < (block + 1) * BLOCK_TOKENS; i++) {
        hash = Math.imul(hash ^ tokens[i], 0x01000193) >>> 0;
      }
      if (!missed && this.#blocks.has(hash)) {
        cached += BLOCK_TOKENS;
        this.#blocks.delete(hash); // refreshed below as most recently used
      } else {
        missed = true;
      }
      this.#blocks.set(hash, true);
    }
    while (this.#blocks.size > this.#capacity) {
      this.#blocks.delete(this.#blocks.keys().next().value!);
    }
    this.#queries += tokens.length;
    this.#hits += cached;
    return cached;
  }
}
