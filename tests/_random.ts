/**
 * A seeded generator of numbers in [0, 1) (mulberry32), for tests and
 * benchmarks whose inputs must be the same on every run: a failing run can
 * be replayed, and every policy of a benchmark meets the same sessions.
 *
 * @module
 */

/** A generator of numbers in [0, 1), the same sequence for the same `seed`. */
export function seededRandom(seed: number): () => number {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
