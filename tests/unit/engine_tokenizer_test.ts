/** Token counts asked of the engine (lib/engine/engine_tokenizer.ts), against the simulator. */

import assert, { equal } from "node:assert/strict";
import { engineTokenCount } from "../../lib/engine/engine_tokenizer.ts";
import { startSimulator } from "../../lib/engine/simulator.ts";
import { messageTokenBound } from "../../lib/tokens.ts";

Deno.test("token counts: the engine's /tokenize where it has one, nothing where it has not", async () => {
  const sim = await startSimulator({ apiKey: "k" });
  const bare = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen() {} },
    () => new Response("not found", { status: 404 }),
  );
  try {
    const text = "You guide the player through the maze.";
    const counted = await engineTokenCount({ baseUrl: sim.url, apiKey: "k", model: "m" }, text);
    assert(counted !== undefined && counted > 0 && counted < messageTokenBound(text));
    const endpoint = { baseUrl: `http://127.0.0.1:${bare.addr.port}/v1`, apiKey: "", model: "m" };
    equal(await engineTokenCount(endpoint, text), undefined);
  } finally {
    await sim.close();
    await bare.shutdown();
  }
});
