/** The prefix cache's model (lib/engine/prefix_cache.ts): which blocks of a prompt hit. */

import { deepEqual, equal } from "node:assert/strict";
import { PrefixCache } from "../../lib/engine/prefix_cache.ts";

Deno.test("prefix cache: whole blocks of an unchanged prefix hit; a change early misses the rest", () => {
  const cache = new PrefixCache(1000);
  const turn1 = Array.from({ length: 40 }, (_, i) => i); // 2 full blocks
  equal(cache.lookup(turn1), 0);
  const turn2 = [...turn1, ...Array.from({ length: 30 }, (_, i) => 100 + i)]; // 4 full blocks
  equal(cache.lookup(turn2), 32);
  // Dropping the first turn changes every block after it.
  equal(cache.lookup(turn2.slice(5)), 0);
  deepEqual([cache.queries, cache.hits], [40 + 70 + 65, 32]);
  // Least recently used blocks go beyond capacity.
  const small = new PrefixCache(2);
  small.lookup(turn2);
  equal(small.lookup(turn1), 0);
});
