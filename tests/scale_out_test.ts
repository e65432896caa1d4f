/**
 * Scale-out: instances in one share group split the requests of one broker,
 * share one session store, and never run two turns of one session at once.
 */

import assert, { equal } from "node:assert/strict";
import { startSimulator } from "../lib/engine/simulator.ts";
import {
  freePort,
  mosquittoTest as test,
  startMosquitto,
  startService,
  TestClient,
  waitFor,
} from "./_helpers.ts";

/**
 * Runs `fn` against instances `a` and `b` of one share group, on one broker,
 * one simulated engine (first token after `ttftMs`) and one data directory.
 */
async function withInstances(
  options: { ttftMs: number; args: (index: number) => string[] },
  fn: (client: TestClient) => Promise<void>,
): Promise<void> {
  const broker = await startMosquitto();
  const sim = await startSimulator({ ttftMs: options.ttftMs, itlMs: 1 });
  const dataDir = await Deno.makeTempDir({ prefix: "vllm-mqtt-data-" });
  const instances = await Promise.all(["a", "b"].map((name, i) =>
    startService([
      "--engine=url",
      `--engine-url=${sim.url}`,
      `--mqtt-url=${broker.url}`,
      `--data-dir=${dataDir}`,
      "--projects=maze",
      "--share-group=maze-bridge",
      `--mqtt-client-id=vllm-mqtt-${name}`,
      ...options.args(i),
    ])
  ));
  const client = await TestClient.connect(broker.url);
  try {
    await fn(client);
  } finally {
    await client.close();
    for (const instance of instances) await instance.stop();
    await sim.close();
    await broker.stop();
    await Deno.remove(dataDir, { recursive: true });
  }
}

test("two instances: quick turns of one session never run at once (the session lease)", async () => {
  await withInstances({ ttftMs: 30, args: () => ["--rate-limit=0"] }, async (client) => {
    await client.subscribe("maze/assistant_response/#");
    // Odd, so that the broker's round robin sends a session's turns to both instances.
    const sessions = 5;
    const turns = 4;
    // Every turn of every session sent at once: the broker spreads them over both instances.
    for (let t = 1; t <= turns; t++) {
      for (let s = 0; s < sessions; s++) {
        await client.send("maze/user_input", {
          session_id: `q${s}`,
          message: `turn ${t}`,
          request_id: `q${s}-${t}`,
        });
      }
    }
    for (let s = 0; s < sessions; s++) {
      const seen = new Set<number>();
      for (let t = 1; t <= turns; t++) {
        const reply = await client.final(`q${s}`, `q${s}-${t}`, 30_000);
        const n = Number((reply.json!.response as string).match(/Turn (\d+)/)?.[1]);
        seen.add(n);
      }
      // Each turn saw every turn before it: no two ran on the same history.
      equal([...seen].sort().join(","), "1,2,3,4", `session q${s}`);
    }
  });
});

test("two instances in a share group: each request answered exactly once, both serve", async () => {
  const ports = [freePort(), freePort()];
  await withInstances({ ttftMs: 20, args: (i) => [`--http-port=${ports[i]}`] }, async (client) => {
    await client.subscribe(["maze/assistant_response/#", "vllm-mqtt/status/#"]);
    const n = 20;
    for (let i = 0; i < n; i++) {
      await client.send("maze/user_input", {
        session_id: `s${i}`,
        message: "hi",
        request_id: `r${i}`,
      });
    }
    for (let i = 0; i < n; i++) {
      const reply = await client.final(`s${i}`, `r${i}`);
      equal(reply.json!.type, "done", JSON.stringify(reply.json));
    }
    await new Promise((resolve) => setTimeout(resolve, 300)); // room for a duplicate to show
    const done = client.received.filter((m) => m.json?.type === "done");
    equal(done.length, n, "a request was answered twice or not at all");
    // mosquitto hands shared-subscription messages out in turn: both instances served.
    const served = await Promise.all(ports.map(async (port) => {
      const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
      return Number(metrics.match(/outcome="answered"\} (\d+)/)?.[1] ?? 0);
    }));
    equal(served[0] + served[1], n);
    assert(served[0] > 0 && served[1] > 0, `one instance served all: ${served}`);
    // Each instance keeps its own retained status.
    await waitFor(() =>
      ["a", "b"].every((name) =>
        client.received.some((m) =>
          m.topic === `vllm-mqtt/status/vllm-mqtt-${name}` && m.json?.status === "online"
        )
      )
    );
  });
});
