/**
 * Hardening: random and mutated payloads while a real client keeps being
 * served; the broker going away in the middle of traffic.
 */

import assert, { equal } from "node:assert/strict";
import {
  freePort,
  mosquittoTest as test,
  removeTempDir,
  tempDir,
  TestClient,
  waitFor,
  withService,
} from "./_helpers.ts";
import { seededRandom } from "./_random.ts";

const ODD_TEXT = [
  "",
  "\u0000",
  "\uD800", // a lone surrogate
  "\u202Eevil",
  "\u200B\u200D",
  "🧬🏎️",
  "a/b",
  "+",
  "#",
  "$SYS",
  "x".repeat(200),
  "<think>",
  "</think>",
  "Error: ",
  "null",
];

/** One payload: random bytes, or a valid request broken in one of many ways. */
function fuzzPayload(next: () => number): Uint8Array | string {
  const pick = <T>(items: readonly T[]): T => items[Math.floor(next() * items.length)];
  const valid: Record<string, unknown> = next() < 0.5
    ? { session_id: `f${Math.floor(next() * 50)}`, message: "hi", request_id: String(next()) }
    : { sessionId: `f${Math.floor(next() * 50)}`, message: "hi", temperature: 0.5 };
  const text = JSON.stringify(valid);
  switch (Math.floor(next() * 10)) {
    case 0: // random bytes, often not UTF-8
      return Uint8Array.from({ length: Math.floor(next() * 64) }, () => Math.floor(next() * 256));
    case 1: // truncated
      return text.slice(0, Math.floor(next() * text.length));
    case 2: { // a field of the wrong type
      const key = pick(Object.keys(valid).concat(["priority", "params", "stream", "cancel"]));
      return JSON.stringify({ ...valid, [key]: pick([1, -1e308, true, null, [], {}, "x"]) });
    }
    case 3: // a huge string, sometimes past the payload cap
      return JSON.stringify({ ...valid, message: "y".repeat(Math.floor(next() * 100_000)) });
    case 4: // odd Unicode anywhere
      return JSON.stringify({ ...valid, message: pick(ODD_TEXT), session_id: pick(ODD_TEXT) });
    case 5: // topic characters injected into the session id
      return JSON.stringify({ ...valid, session_id: `a${pick(["/", "+", "#", "/../", "\n"])}b` });
    case 6: // deeply nested
      return "[".repeat(Math.floor(next() * 5000)) + "]".repeat(Math.floor(next() * 5000));
    case 7: // params out of range
      return JSON.stringify({
        ...valid,
        params: { max_tokens: -5, temperature: 1e9, top_p: "x", stop: [1, 2], seed: 1.5 },
        priority: 1e12,
      });
    case 8: // not an object
      return pick(["[]", "1", '"s"', "null", "true", "{}", " "]);
    default: // bytes flipped in a valid request
      return new TextEncoder().encode(text).map((byte) =>
        next() < 0.05 ? Math.floor(next() * 256) : byte
      );
  }
}

test("10,000 random and mutated payloads: every valid request is still answered", async () => {
  await withService(
    { args: ["--max-queue=20000", "--rate-limit=0", "--rate-limit-client=0"] },
    async ({ client, broker, service }) => {
      const fuzzer = await TestClient.connect(broker.url);
      const next = seededRandom(20261127);
      const tried = 10_000;
      let valid = 0;
      const validTraffic = (async () => {
        for (let i = 0; i < 40; i++) {
          await client.send("maze/user_input", {
            session_id: "steady",
            message: `turn ${i}`,
            request_id: `v${i}`,
          });
          const reply = (await client.final("steady", `v${i}`, 60_000)).json!;
          equal(reply.type, "done", JSON.stringify(reply));
          valid++;
        }
      })();
      for (let i = 0; i < tried; i++) {
        const payload = fuzzPayload(next);
        // mqtt.js types ask for a Node Buffer; it sends any Uint8Array.
        fuzzer.client.publish(
          i % 7 === 0 ? "general/user_input" : "maze/user_input",
          payload as string,
          {
            qos: 0,
          },
        );
        if (i % 200 === 0) await new Promise((resolve) => setTimeout(resolve, 5));
      }
      await validTraffic;
      await fuzzer.close();
      console.log(`fuzz: ${tried} payloads tried, ${valid} valid requests answered`);
      equal(valid, 40);
      // Still alive, and nothing escaped as an unhandled rejection.
      await client.send("general/user_input", { session_id: "after", message: "still there?" });
      equal((await client.final("after")).json!.type, "done");
      assert(!/unhandled|Uncaught/i.test(service.log()), service.log().slice(-2000));
    },
  );
});

test("the broker restarts mid-traffic: every accepted request is answered once", async () => {
  const store = await tempDir("vllm-mqtt-broker-store-");
  // mosquitto started as root runs as its own user, which may not write in a folder only we may:
  // it would lose its sessions (and the requests waiting in them) at every restart.
  await Deno.chmod(store, 0o777);
  try {
    await withService({
      args: ["--rate-limit=0"],
      // Answers come 1.5 s after a request: the broker is down while they are being generated.
      sim: { ttftMs: 1500, itlMs: 1 },
      brokerConfig: ["persistence true", `persistence_location ${store}/`],
    }, async ({ broker, service }) => {
      // A client with a persistent session, as the devices of the games use.
      const device = await TestClient.connect(broker.url, {
        clientId: "device-1",
        clean: false,
      });
      await device.subscribe("maze/assistant_response/#");
      const answers = new Map<string, number>();
      device.client.on("message", (_topic, payload) => {
        const reply = JSON.parse(new TextDecoder().decode(payload));
        if (reply.type === "done") {
          answers.set(reply.request_id, (answers.get(reply.request_id) ?? 0) + 1);
        }
      });
      const sent: string[] = [];
      const send = async (id: string, session: string) => {
        sent.push(id);
        await device.send("maze/user_input", {
          session_id: session,
          message: "go",
          request_id: id,
        });
      };
      for (let i = 0; i < 20; i++) await send(`b${i}`, `b${i % 5}`);
      await broker.stop("SIGTERM");
      const saved = await Deno.stat(`${store}/mosquitto.db`).then(() => true, () => false);
      await new Promise((resolve) => setTimeout(resolve, 1000));
      // Requests that come while the service is still away wait in its session at the broker.
      // The service is paused until they are in, so that it cannot reconnect first.
      Deno.kill(service.child.pid, "SIGSTOP");
      try {
        await broker.start();
        for (let i = 0; i < 10; i++) await send(`a${i}`, `a${i % 5}`);
      } finally {
        Deno.kill(service.child.pid, "SIGCONT");
      }
      await waitFor(() => service.log().includes("Reconnected"), 20_000, "the service's reconnect");
      const missing = () => sent.filter((id) => !answers.has(id));
      await waitFor(
        () => missing().length === 0,
        30_000,
        () =>
          `every answer: ${missing().length} of ${sent.length} missing (${
            missing().join(", ")
          }); ` +
          `the broker ${saved ? "saved" : "did not save"} its sessions at the restart`,
      );
      await new Promise((resolve) => setTimeout(resolve, 500)); // room for a duplicate to show
      const twice = [...answers.values()].filter((n) => n > 1).length;
      console.log(
        `broker restart: ${sent.length} accepted, ${answers.size} answered, ` +
          `${sent.length - answers.size} lost, ${twice} answered twice`,
      );
      equal(twice, 0);
      await device.close();
    });
  } finally {
    await removeTempDir(store);
  }
});

test("engine faults: 500s, a hang and a dropped stream each end in a clear error; no half turn is saved", async () => {
  const httpPort = freePort();
  await withService({
    args: [
      "--request-timeout=2",
      "--engine-retries=1",
      "--engine-wait=3",
      `--http-port=${httpPort}`,
      "--rate-limit=0",
    ],
  }, async ({ client, sim }) => {
    const ask = async (id: string, message: string) => {
      await client.send("maze/user_input", { session_id: "e", message, request_id: id });
      return (await client.final("e", id, 20_000)).json!;
    };
    const code = (reply: Record<string, unknown>) => (reply.error as { code: string })?.code;
    const ready = async () => {
      const response = await fetch(`http://127.0.0.1:${httpPort}/readyz`);
      await response.body?.cancel();
      return response.status === 200;
    };
    equal((await ask("1", "first")).type, "done");

    // A stream cut after two tokens: an error, and nothing of that turn is kept.
    sim.fault = "drop";
    equal(code(await ask("2", "dropped")), "engine_unavailable");
    // A hang: `timeout` once --request-timeout has passed.
    sim.fault = "hang";
    equal(code(await ask("3", "hung")), "timeout");
    // 500s on every endpoint: `engine_unavailable`; the circuit opens and /readyz says so.
    sim.fault = "error";
    for (const id of ["4", "5", "6"]) equal(code(await ask(id, "broken")), "engine_unavailable");
    await waitFor(async () => !(await ready()), 10_000, "the circuit to open");
    // While it is open, a request waits up to --engine-wait, then gets engine_unavailable.
    const waited = performance.now();
    equal(code(await ask("7", "still broken")), "engine_unavailable");
    assert(performance.now() - waited >= 2500, "the request did not wait for the engine");

    // The engine is back: the probe closes the circuit and requests flow again.
    sim.fault = undefined;
    await waitFor(ready, 10_000, "the circuit to close");
    // "Turn 2": only the first turn was saved; no failed one left a half answer behind.
    assert(/Turn 2: you said "back"/.test((await ask("8", "back")).response as string));
  });
});
