/**
 * Faults around the service's life: requests that wait in the broker while it
 * is down, retained and redelivered copies, a broker that is gone at shutdown
 * or at start, a second instance with the same client id. A real mosquitto,
 * the service as a child process, the simulated engine over HTTP, and real
 * MQTT clients.
 */

import assert, { deepEqual, equal, match } from "node:assert/strict";
import { TakeoverWatch } from "../lib/mqtt/connect.ts";
import {
  freePort,
  mosquittoTest as test,
  ROOT,
  servicePermissions,
  type ServiceProcess,
  startMosquitto,
  startService,
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

test("a request the broker redelivers to a frozen service is answered once", async () => {
  const store = await Deno.makeTempDir({ prefix: "vllm-mqtt-broker-store-" });
  try {
    await withService({
      brokerConfig: ["persistence true", `persistence_location ${store}/`],
    }, async ({ broker, service }) => {
      const device = await TestClient.connect(broker.url, { clientId: "frozen-dev", clean: false });
      try {
        await device.subscribe("maze/assistant_response/#");
        Deno.kill(service.child.pid, "SIGSTOP");
        // With and without a request_id: a redelivered packet is the same request either way.
        await device.send("maze/user_input", {
          session_id: "dup-a",
          message: "one",
          request_id: "r1",
        });
        await device.send("maze/user_input", { session_id: "dup-b", message: "one" });
        // The broker hands both to the frozen service's socket, then restarts from its
        // persistence, where they wait unacknowledged; it sends them again (DUP) on resume.
        await new Promise((resolve) => setTimeout(resolve, 300));
        await broker.stop("SIGTERM");
        await broker.start();
        Deno.kill(service.child.pid, "SIGCONT");
        await device.final("dup-a", "r1", 30_000);
        await device.next((m) => m.json?.response === answer(1, "one") && /dup-b$/.test(m.topic));
        // A later turn of each session: its answer follows any second answer to the first.
        await device.send("maze/user_input", {
          session_id: "dup-a",
          message: "two",
          request_id: "r2",
        });
        await device.send("maze/user_input", { session_id: "dup-b", message: "two" });
        const a2 = await device.final("dup-a", "r2", 30_000);
        const b2 = await device.next((m) =>
          m.json?.type === "done" && /dup-b$/.test(m.topic) &&
          /"two"/.test(String(m.json.response)), 30_000);
        const finals = (session: string) =>
          device.received.filter((m) => m.topic.endsWith(`/${session}`) && m.json?.type === "done")
            .length;
        console.log(
          `frozen service, broker restarted: dup-a ${finals("dup-a")} answers, dup-b ${
            finals("dup-b")
          } answers (2 each expected)`,
        );
        deepEqual(finals("dup-a"), 2);
        deepEqual(finals("dup-b"), 2);
        // The history holds each first turn once.
        deepEqual(a2.json!.response, answer(2, "two"));
        deepEqual(b2.json!.response, answer(2, "two"));
      } finally {
        await device.close();
      }
    });
  } finally {
    await Deno.remove(store, { recursive: true }).catch(() => {});
  }
});

test("SIGTERM with the broker gone ends within --shutdown-timeout, an answer in flight", async () => {
  await withService(
    { args: ["--shutdown-timeout=1"], sim: { ttftMs: 5, itlMs: 40, fillerTokens: 2000 } },
    async ({ client, broker, service }) => {
      await client.send("maze/user_input", { session_id: "long", message: "talk" });
      await client.next((m) => m.json?.type === "delta");
      await broker.stop();
      await waitFor(() => /MQTT error|Reconnect/.test(service.log()) || true, 1000);
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
  const dataDir = await Deno.makeTempDir({ prefix: "vllm-mqtt-data-" });
  const args = [
    "--engine=sim",
    `--mqtt-url=mqtt://127.0.0.1:${brokerPort}`,
    `--data-dir=${dataDir}`,
    "--projects=maze",
    `--http-port=${httpPort}`,
  ];
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", ...servicePermissions(args), `${ROOT}main.ts`, ...args],
    cwd: ROOT,
    stdout: "null",
    stderr: "null",
  }).spawn();
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
    child.kill("SIGTERM");
    await child.status;
    await broker?.stop();
    if (broker) await Deno.remove(broker.dir, { recursive: true }).catch(() => {});
    await Deno.remove(dataDir, { recursive: true }).catch(() => {});
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

    // Another HTTP port, the same client id: the newcomer is taken over and stops. (An instance
    // taken over within its first seconds on a connection may be the newcomer itself: the
    // first one here has been connected for longer.)
    await new Promise((resolve) => setTimeout(resolve, TakeoverWatch.QUICK_MS + 500));
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
