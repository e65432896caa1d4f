/**
 * The simulated engine's prefill queue and the load its /metrics shows (lib/engine/simulator.ts),
 * read as the router reads vLLM's (lib/routing/engine_load.ts).
 */

import { deepEqual, equal } from "node:assert/strict";
import { startSimulator } from "../../lib/engine/simulator.ts";
import { parseEngineLoad } from "../../lib/routing/engine_load.ts";

const ask = (url: string, text: string) =>
  fetch(`${url}/chat/completions`, {
    method: "POST",
    body: JSON.stringify({ messages: [{ role: "user", content: text }], stream: true }),
  });

Deno.test("simulator: with a prefill queue, prompts wait for the prefills ahead and /metrics says so", async () => {
  // A minute a token: nothing gets its first token while the test looks.
  const sim = await startSimulator({ prefillQueue: true, prefillMsPerToken: 60_000 });
  const load = async () =>
    parseEngineLoad(await (await fetch(sim.url.replace(/\/v1$/, "/metrics"))).text());
  try {
    deepEqual(await load(), {
      waiting: 0,
      running: 0,
      kvCacheUsage: 0,
      prefixCacheHits: 0,
      prefixCacheQueries: 0,
      cacheTokens: 65536 * 16,
    });
    const streams = [];
    for (let i = 0; i < 3; i++) streams.push(await ask(sim.url, `question number ${i}`));
    const busy = await load();
    // One prefilling (running), two waiting behind it.
    deepEqual([busy.running, busy.waiting], [1, 2]);
    equal(busy.kvCacheUsage! > 0, true);
    for (const stream of streams) await stream.body!.cancel();
  } finally {
    await sim.close();
  }
});

Deno.test("simulator: without the queue (the default), prefills overlap and none waits", async () => {
  const sim = await startSimulator({ prefillMsPerToken: 60_000 });
  try {
    const streams = [];
    for (let i = 0; i < 3; i++) streams.push(await ask(sim.url, `question number ${i}`));
    const load = parseEngineLoad(
      await (await fetch(sim.url.replace(/\/v1$/, "/metrics"))).text(),
    );
    deepEqual([load.running, load.waiting], [3, 0]);
    for (const stream of streams) await stream.body!.cancel();
  } finally {
    await sim.close();
  }
});
