/**
 * Faults around the service's life: requests that wait in the broker while it
 * is down, retained and redelivered copies, a broker that is gone at shutdown
 * or at start, a second instance with the same client id. A real mosquitto,
 * the service as a child process, the simulated engine over HTTP, and real
 * MQTT clients.
 */

import assert, { deepEqual, equal, match } from "node:assert/strict";
import { startSimulator } from "../lib/engine/simulator.ts";
import { REPEAT_WINDOW_MS } from "../lib/service/stop_signals.ts";
import {
  freePort,
  mosquittoTest as test,
  removeTempDir,
  type ServiceProcess,
  spawnService,
  startMosquitto,
  startService,
  tempDir,
  TestClient,
  waitFor,
  withService,
} from "./_helpers.ts";

/** The simulated engine's answer for a session's `turn`-th message `text`. */
const answer = (turn: number, text: string) => `[Maze guide] Turn ${turn}: you said "${text}".`;

/** Sends `signal` and waits up to `ms` for the exit: its code, or "hung" (then it is killed). */
async function exitWithin(
  service: ServiceProcess,
  signal: Deno.Signal,
  ms: number,
): Promise<number | "hung"> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const hung = new Promise<"hung">((resolve) => timer = setTimeout(() => resolve("hung"), ms));
  try {
    service.child.kill(signal);
  } catch { /* gone already */ }
  const outcome = await Promise.race([service.child.status.then((s) => s.code), hung]);
  clearTimeout(timer);
  if (outcome === "hung") await service.stop("SIGKILL");
  return outcome;
}

test("requests sent while the service is down are answered at its next start (SIGTERM, SIGKILL)", async () => {
  await withService({}, async ({ client, service, args }) => {
    let running = service;
    try {
      for (const signal of ["SIGTERM", "SIGKILL"] as const) {
        equal(await running.stop(signal), signal === "SIGTERM" ? 0 : 137);
        const ids: string[] = [];
        for (let i = 0; i < 20; i++) {
          ids.push(`${signal}-${i}`);
          await client.send("maze/user_input", {
            session_id: `down-${signal}-${i % 5}`,
            message: "while you were away",
            request_id: `${signal}-${i}`,
          });
        }
        running = await startService(args);
        const answered = () =>
          new Set(
            client.received.filter((m) => m.json?.type === "done").map((m) => m.json!.request_id),
          );
        await waitFor(() => ids.every((id) => answered().has(id)), 30_000).catch(() => {});
        const missing = ids.filter((id) => !answered().has(id));
        console.log(
          `after ${signal}: ${ids.length} sent while down, ${
            ids.length - missing.length
          } answered at the next start`,
        );
        deepEqual(missing, [], `${missing.length} of ${ids.length} never answered`);
      }
    } finally {
      await running.stop();
    }
  });
});

test("a retained request or command is acted on once, not again at every start", async () => {
  await withService({}, async ({ client, service, args }) => {
    await client.send("maze/user_input", { session_id: "ret", message: "kept", request_id: "k1" }, {
      retain: true,
    });
    deepEqual((await client.final("ret", "k1")).json!.response, answer(1, "kept"));
    await client.send("maze/user_input", { session_id: "keep", message: "one" });
    await client.next((m) => m.json?.response === answer(1, "one"));
    await client.send("maze/clear_history/keep", "{}", { retain: true });
    await client.next((m) => m.topic === "maze/assistant_response/keep" && /cleared/.test(m.text));

    let running = service;
    try {
      for (const start of [1, 2]) {
        await running.stop();
        running = await startService(args);
        await waitFor(
          () => /Ignoring the retained message on maze\/clear_history\/keep/.test(running.log()),
          10_000,
          "the retained command to be reported",
        );
        match(running.log(), /Ignoring the retained message on maze\/user_input/);
        await client.send("maze/user_input", {
          session_id: "keep",
          message: `again ${start}`,
          request_id: `again-${start}`,
        });
        // The history was not cleared again: this is the session's turn 1 + start.
        deepEqual(
          (await client.final("keep", `again-${start}`)).json!.response,
          answer(start, `again ${start}`),
        );
      }
    } finally {
      await running.stop();
    }
    const answers = client.received.filter((m) =>
      m.json?.request_id === "k1" && m.json.type === "done"
    );
    deepEqual(answers.length, 1, answers.map((m) => m.text).join("\n"));
    // Clear the retained messages, as an operator would.
    await client.send("maze/user_input", "", { retain: true });
    await client.send("maze/clear_history/keep", "", { retain: true });
  });
});

/**
 * A TCP proxy between the service and the broker that can swallow the
 * service's next PUBACK and cut the connection, as a freeze or a network
 * fault does: the broker then delivers that request again, flagged DUP, when
 * the service reconnects (its persistent session still holds it).
 */
class AckLosingProxy {
  readonly port: number;
  loseNextAck = false;
  readonly #listener: Deno.Listener;
  readonly #conns = new Set<Deno.Conn>();
  readonly #accepting: Promise<void>;

  constructor(upstreamPort: number) {
    this.#listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    this.port = (this.#listener.addr as Deno.NetAddr).port;
    this.#accepting = this.#accept(upstreamPort);
  }

  async #accept(upstreamPort: number): Promise<void> {
    for await (const service of this.#listener) {
      const broker = await Deno.connect({ hostname: "127.0.0.1", port: upstreamPort });
      this.#conns.add(service).add(broker);
      const cut = () => {
        for (const conn of [service, broker]) {
          this.#conns.delete(conn);
          try {
            conn.close();
          } catch { /* closed */ }
        }
      };
      this.#pipe(broker, service, () => true).finally(cut);
      this.#pipe(service, broker, (frame) => {
        if (frame[0] >> 4 !== 4 || !this.loseNextAck) return true; // not a PUBACK
        this.loseNextAck = false;
        return false;
      }).finally(cut);
    }
  }

  /** Copies whole MQTT packets; stops (and so cuts) at the first one `pass` refuses. */
  async #pipe(from: Deno.Conn, to: Deno.Conn, pass: (frame: Uint8Array) => boolean) {
    let pending = new Uint8Array(0);
    const chunk = new Uint8Array(65_536);
    while (true) {
      const n = await from.read(chunk).catch(() => null);
      if (n === null) return;
      pending = new Uint8Array([...pending, ...chunk.subarray(0, n)]);
      while (pending.length >= 2) {
        let length = 0, i = 1, byte: number;
        do {
          byte = pending[i];
          length += (byte & 127) * 128 ** (i - 1);
          i++;
        } while (byte & 128 && i < pending.length);
        if (byte & 128 || pending.length < i + length) break;
        const frame = pending.slice(0, i + length);
        pending = pending.slice(i + length);
        if (!pass(frame)) return;
        await to.write(frame).catch(() => {});
      }
    }
  }

  async close(): Promise<void> {
    this.#listener.close();
    for (const conn of this.#conns) {
      try {
        conn.close();
      } catch { /* closed */ }
    }
    await this.#accepting.catch(() => {});
  }
}

test("a request the broker delivers again (its acknowledgement lost) is answered once", async () => {
  const broker = await startMosquitto();
  const sim = await startSimulator({ ttftMs: 5, itlMs: 1 });
  const proxy = new AckLosingProxy(broker.port);
  const dataDir = await tempDir("vllm-mqtt-data-");
  const client = await TestClient.connect(broker.url);
  let service: ServiceProcess | undefined;
  try {
    await client.subscribe("maze/assistant_response/#");
    service = await startService([
      "--engine=url",
      `--engine-url=${sim.url}`,
      `--mqtt-url=mqtt://127.0.0.1:${proxy.port}`,
      `--data-dir=${dataDir}`,
      "--projects=maze",
      `--mqtt-client-id=svc-${crypto.randomUUID()}`,
    ]);
    // With and without a request_id: a packet delivered again is the same request either way.
    for (const session of ["dup-a", "dup-b"]) {
      proxy.loseNextAck = true;
      const requestId = session === "dup-a" ? { request_id: "r1" } : {};
      await client.send("maze/user_input", { session_id: session, message: "one", ...requestId });
      await waitFor(() => !proxy.loseNextAck, 10_000, "the acknowledgement to be lost");
      // A later turn: the broker sends the copy before it, so any second answer comes first.
      await client.send("maze/user_input", {
        session_id: session,
        message: "two",
        request_id: "r2",
      });
      await client.final(session, "r2", 30_000);
    }
    const finals = (session: string) =>
      client.received.filter((m) => m.topic.endsWith(`/${session}`) && m.json?.type === "done");
    console.log(
      `acknowledgement lost, request delivered again: dup-a answered ${
        finals("dup-a").length - 1
      } time(s), dup-b ${finals("dup-b").length - 1} time(s)`,
    );
    deepEqual(finals("dup-a").map((m) => m.json!.request_id), ["r1", "r2"]);
    deepEqual(finals("dup-b").length, 2);
    // The history holds each first turn once.
    for (const session of ["dup-a", "dup-b"]) {
      deepEqual(finals(session).at(-1)!.json!.response, answer(2, "two"));
    }
  } catch (error) {
    console.error(`--- service log ---\n${service?.log().slice(-4000)}`);
    throw error;
  } finally {
    await client.close();
    await service?.stop();
    await proxy.close();
    await sim.close();
    await broker.close();
    await removeTempDir(dataDir);
  }
});

test("SIGTERM with the broker gone ends within --shutdown-timeout, an answer in flight", async () => {
  await withService(
    { args: ["--shutdown-timeout=1"], sim: { ttftMs: 5, itlMs: 40, fillerTokens: 2000 } },
    async ({ client, broker, service }) => {
      await client.send("maze/user_input", { session_id: "long", message: "talk" });
      await client.next((m) => m.json?.type === "delta");
      await broker.stop();
      await waitFor(() => service.log().includes("Lost the connection to the broker"));
      const code = await exitWithin(service, "SIGTERM", 20_000);
      assert(code !== "hung", `still running 20 s after SIGTERM:\n${service.log().slice(-2000)}`);
      equal(code, 0);
      await broker.start();
    },
  );
});

test("a second SIGINT stops at once while an answer is being generated", async () => {
  await withService(
    { args: ["--shutdown-timeout=120"], sim: { ttftMs: 5, itlMs: 40, fillerTokens: 5000 } },
    async ({ client, service }) => {
      await client.send("maze/user_input", { session_id: "long", message: "talk" });
      await client.next((m) => m.json?.type === "delta");
      service.child.kill("SIGINT");
      await waitFor(() => /SIGINT: stopping/.test(service.log()), 10_000, "the first stop");
      // A person's second Ctrl-C: later than the window in which a repeat is a copy of the first
      // (as `deno task` passes one on), counted from when the service logged the first.
      await new Promise((resolve) => setTimeout(resolve, 2 * REPEAT_WINDOW_MS));
      const code = await exitWithin(service, "SIGINT", 20_000);
      assert(
        code !== "hung",
        `still running after a second SIGINT:\n${service.log().slice(-2000)}`,
      );
      equal(code, 1);
      match(service.log(), /SIGINT again: stopping now/);
    },
  );
});

test("/healthz answers before the broker is there; /readyz says what is missing", async () => {
  const brokerPort = freePort();
  const httpPort = freePort();
  const dataDir = await tempDir("vllm-mqtt-data-");
  const args = [
    "--engine=sim",
    `--mqtt-url=mqtt://127.0.0.1:${brokerPort}`,
    `--data-dir=${dataDir}`,
    "--projects=maze",
    `--http-port=${httpPort}`,
  ];
  const service = spawnService(args);
  const get = (path: string) => fetch(`http://127.0.0.1:${httpPort}${path}`);
  let broker;
  try {
    await waitFor(
      async () => {
        try {
          const health = await get("/healthz");
          await health.body?.cancel();
          return health.status === 200;
        } catch {
          return false;
        }
      },
      20_000,
      "/healthz",
    );
    const ready = await get("/readyz");
    equal(ready.status, 503);
    equal((await ready.json()).broker, false);
    broker = await startMosquitto([], brokerPort);
    await waitFor(
      async () => {
        const response = await get("/readyz");
        await response.body?.cancel();
        return response.status === 200;
      },
      60_000,
      "/readyz once the broker is up",
    );
  } finally {
    await service.stop();
    await broker?.close();
    await removeTempDir(dataDir);
  }
});

test("a second instance with the same client id stops, naming the option; the first serves on", async () => {
  const httpPort = freePort();
  await withService({ args: [`--http-port=${httpPort}`] }, async ({ client, service, args }) => {
    // The same flags: the HTTP port is taken, and it stops before it touches the broker.
    const same = await startService(args, { expectExit: true });
    equal(await same.stop(), 2);
    match(same.log(), new RegExp(`'--http-port' ${httpPort} .* is in use`));
    assert(!/Reconnected/.test(service.log()), "the first instance was knocked off");

    // Another HTTP port, the same client id: the newcomer sees the older instance announce
    // itself, is taken over when that one reconnects, and stops.
    const other = args.filter((arg) => !arg.startsWith("--http-port")).concat("--http-port=0");
    const second = await startService(other, { expectExit: true, timeoutMs: 60_000 })
      .catch((error) => {
        throw new Error(`the second instance did not stop: ${error.message}`);
      });
    equal(await second.stop(), 1);
    match(second.log(), /--mqtt-client-id/);
    await client.send("maze/user_input", { session_id: "first", message: "still you?" });
    deepEqual((await client.final("first", undefined, 30_000)).json!.type, "done");
  });
});

test("a cancel with nothing to cancel is answered not_found", async () => {
  await withService({}, async ({ client }) => {
    await client.send("maze/user_input", { session_id: "idle", cancel: true });
    const reply = await client.final("idle");
    deepEqual((reply.json!.error as { code: string }).code, "not_found", reply.text);
    await client.send("maze/user_input", { session_id: "idle", cancel: true, request_id: "nope" });
    const named = await client.final("idle", "nope");
    match((named.json!.error as { message: string }).message, /no request nope/);
  });
});

test("control commands take their place in the session's order, like turns", async () => {
  await withService({ args: ["--rate-limit=0"], sim: { ttftMs: 200 } }, async ({ client }) => {
    const text = (m: { json?: Record<string, unknown>; text: string }) =>
      String(m.json?.response ?? m.text);
    // Sent back to back: delete, a new prompt, a turn. The turn must see the new prompt.
    const tries = 20;
    for (let i = 0; i < tries; i++) {
      await client.send(`maze/delete_session/o${i}`, { session_id: `o${i}` });
      await client.send(`maze/template/o${i}`, { session_id: `o${i}`, template: "You are Cap." });
      await client.send("maze/user_input", { session_id: `o${i}`, message: "hi", request_id: "t" });
    }
    const lost: number[] = [];
    for (let i = 0; i < tries; i++) {
      const reply = await client.final(`o${i}`, "t", 30_000);
      if (!text(reply).startsWith("[You are Cap.] Turn 1")) lost.push(i);
    }
    deepEqual(lost, [], `${lost.length} of ${tries} turns ran without the prompt set before them`);

    // A history cleared while a turn runs stays cleared: the turn's save comes before it.
    await client.send("maze/user_input", { session_id: "c", message: "one", request_id: "1" });
    await client.final("c", "1");
    await client.send("maze/user_input", { session_id: "c", message: "two", request_id: "2" });
    await client.next((m) => m.json?.request_id === "2"); // running: its first delta
    await client.send("maze/clear_history/c", { session_id: "c" });
    await client.send("maze/user_input", { session_id: "c", message: "three", request_id: "3" });
    deepEqual(text(await client.final("c", "2")), answer(2, "two"));
    deepEqual(text(await client.final("c", "3")), answer(1, "three"));
  });
});

test("a request answered before a crash is answered from history when resent, not generated again", async () => {
  await withService({}, async ({ client, service, args }) => {
    await client.send("maze/user_input", { session_id: "crash", message: "one", request_id: "c1" });
    const first = await client.final("crash", "c1");
    // The client missed that answer and the service died: nothing of it is left in memory.
    equal(await service.stop("SIGKILL"), 137);
    const restarted = await startService(args);
    try {
      await client.send("maze/user_input", {
        session_id: "crash",
        message: "one",
        request_id: "c1",
      });
      const again = await client.next((m) =>
        m.json?.request_id === "c1" && m.json.type === "done" && m !== first
      );
      deepEqual(again.json!.response, first.json!.response);
      deepEqual(again.json!.repeated, true);
      await client.send("maze/user_input", {
        session_id: "crash",
        message: "two",
        request_id: "c2",
      });
      deepEqual((await client.final("crash", "c2")).json!.response, answer(2, "two"));
    } finally {
      await restarted.stop();
    }
  });
});
