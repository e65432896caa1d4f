/**
 * The service against brokers that take less than MQTT allows: mosquitto
 * with a packet limit (`max_packet_size`, which drops the connection, and
 * `message_size_limit`, which drops the message), and NATS's MQTT listener
 * (MQTT 3.1.1 only, no `.` or ` ` in topics, no shared subscriptions). One
 * request whose answer the broker cannot take must leave every other
 * session served, and a broker that lacks a feature gets a working service
 * or a refusal that says why.
 */

import { equal, match, ok } from "node:assert/strict";
import mqtt from "mqtt";
import { startSimulator } from "../lib/engine/simulator.ts";
import {
  freePort,
  HAS_MOSQUITTO,
  HAS_NATS,
  HAS_RABBITMQ,
  type OtherBroker,
  type Received,
  removeTempDir,
  startNats,
  startRabbitMq,
  startService,
  tempDir,
  TestClient,
  waitFor,
  withService,
} from "./_helpers.ts";

/** Words of filler in every answer: about 100 KB when a request lets it run. */
const FILLER = 16_000;
/** The engine: long answers, quickly. */
const SIM = { ttftMs: 1, itlMs: 0, fillerTokens: FILLER, maxModelLen: 65_536 };
/** The service can give a request that many tokens. */
const LONG_ANSWERS = ["--max-model-len=65536", "--max-tokens=20"];
/** A request for an answer of about 100 KB. */
const BIG = { max_tokens: FILLER + 50 };

/** Sends `count` small requests from as many sessions; waits for each one's final reply. */
async function pings(client: TestClient, project: string, count = 30): Promise<Received[]> {
  for (let i = 0; i < count; i++) {
    await client.send(`${project}/user_input`, {
      session_id: `ping-${i}`,
      request_id: `p${i}`,
      message: "ping",
    });
  }
  const finals = [];
  for (let i = 0; i < count; i++) finals.push(await client.final(`ping-${i}`, `p${i}`, 30_000));
  return finals;
}

/** The text of an answer, from its `done` or (when it says so) its deltas. */
function answerText(received: Received[], sessionId: string): string {
  const mine = received.filter((m) => m.json?.session_id === sessionId);
  const done = mine.find((m) => m.json!.type === "done")!.json!;
  if (done.response_in_deltas !== true) return done.response as string;
  return mine.filter((m) => m.json!.type === "delta").map((m) => m.json!.delta as string).join("");
}

Deno.test({
  name: "mosquitto max_packet_size, MQTT 5: a 100 KB answer comes as deltas; 30 pings answered",
  ignore: !HAS_MOSQUITTO,
  fn: () =>
    withService({
      sim: SIM,
      args: LONG_ANSWERS,
      mqtt5: true,
      brokerConfig: ["max_packet_size 65536"],
    }, async ({ client, service }) => {
      // Its CONNACK said the limit: nothing to configure.
      match(service.log(), /packets up to 65536 bytes/);
      await client.send("maze/user_input", {
        session_id: "big",
        request_id: "b1",
        message: "tell me everything",
        params: BIG,
      });
      const done = await client.final("big", "b1", 60_000);
      equal(done.json!.type, "done");
      equal(done.json!.response, "");
      equal(done.json!.response_in_deltas, true);
      const text = answerText(client.received, "big");
      ok(text.length > 100_000, `${text.length} characters`);
      ok(text.endsWith(` w${FILLER - 1}`), text.slice(-40));
      const finals = await pings(client, "maze");
      ok(finals.every((m) => m.json!.type === "done"));
      ok(!service.log().includes("Lost the connection"), "the broker never dropped the service");
    }),
});

Deno.test({
  name:
    "mosquitto message_size_limit, MQTT 3.1.1: with --mqtt-max-packet-bytes, long answers are split or refused by style",
  ignore: !HAS_MOSQUITTO,
  fn: () =>
    withService({
      sim: SIM,
      args: [...LONG_ANSWERS, "--mqtt-version=4", "--mqtt-max-packet-bytes=64KiB"],
      brokerConfig: ["message_size_limit 65536"],
    }, async ({ client }) => {
      // Not streamed: the whole answer comes as deltas before the done.
      await client.send("maze/user_input", {
        session_id: "whole",
        request_id: "w1",
        message: "all at once",
        stream: false,
        params: BIG,
      });
      equal((await client.final("whole", "w1", 60_000)).json!.response_in_deltas, true);
      ok(answerText(client.received, "whole").length > 100_000);
      // The original's plain-text style has one message an answer: a clear error instead.
      await client.send("maze/user_input", {
        sessionId: "plain",
        message: "all in one",
        params: BIG,
      });
      const plain = await client.next((m) => m.topic === "maze/assistant_response/plain");
      match(plain.text, /^Error: the answer \(\d+ bytes\) is larger than the broker takes/);
      const finals = await pings(client, "maze");
      ok(finals.every((m) => m.json!.type === "done"));
    }),
});

Deno.test({
  name:
    "mosquitto max_packet_size, MQTT 3.1.1 without the limit set: the refused packet is dropped after 3 tries; 30 pings answered",
  ignore: !HAS_MOSQUITTO,
  fn: () =>
    withService({
      sim: SIM,
      args: [...LONG_ANSWERS, "--mqtt-version=4"],
      brokerConfig: ["max_packet_size 65536"],
    }, async ({ client, service }) => {
      await client.send("maze/user_input", {
        session_id: "big",
        request_id: "b1",
        message: "tell me everything",
        params: BIG,
      });
      // The broker closes the connection at each try of the answer's done, then it is dropped.
      await waitFor(
        () => /Dropped a message to maze\/assistant_response\/big/.test(service.log()),
        60_000,
        "the refused message to be dropped",
      );
      const finals = await pings(client, "maze");
      ok(finals.every((m) => m.json!.type === "done"));
      ok(!service.exited(), "the service is still running");
    }),
});

/** Runs `fn` against nats-server's MQTT listener, the simulated engine and a client. */
function withNats(
  args: string[],
  fn: (client: TestClient, log: () => string) => Promise<void>,
): Promise<void> {
  return withBroker(startNats, args, fn);
}

/** Runs `fn` against a broker `start` starts, the simulated engine and a client. */
async function withBroker(
  start: () => Promise<OtherBroker>,
  args: string[],
  fn: (client: TestClient, log: () => string) => Promise<void>,
): Promise<void> {
  const nats = await start();
  const sim = await startSimulator({ ttftMs: 1, itlMs: 0 });
  const dataDir = await tempDir("vllm-mqtt-data-");
  let service;
  let client;
  try {
    service = await startService([
      "--engine=url",
      `--engine-url=${sim.url}`,
      `--mqtt-url=${nats.url}`,
      `--data-dir=${dataDir}`,
      "--projects=maze",
      "--workers=1",
      ...args,
    ]);
    client = await TestClient.connect(nats.url, { protocolVersion: 4 });
    await client.subscribe("maze/assistant_response/#");
    await fn(client, service.log);
  } catch (error) {
    if (service) console.error(`--- service log ---\n${service.log().slice(-4000)}`);
    throw error;
  } finally {
    await client?.close();
    await service?.stop();
    await sim.close();
    await nats.close();
    await removeTempDir(dataDir);
  }
}

Deno.test({
  name: "NATS: MQTT 5 refused, the service says so and serves with 3.1.1",
  ignore: !HAS_NATS,
  fn: () =>
    withNats([], async (client, log) => {
      match(log(), /does not take MQTT 5 .*using MQTT 3\.1\.1/);
      match(log(), /Connected to broker .* \(MQTT 3\.1\.1/);
      const finals = await pings(client, "maze", 5);
      ok(finals.every((m) => m.json!.type === "done"));
    }),
});

Deno.test({
  name:
    "NATS with --broker-profile nats: a session id with '.' is refused at admission; 30 pings answered",
  ignore: !HAS_NATS,
  fn: () =>
    withNats(["--broker-profile=nats"], async (client, log) => {
      await client.send("maze/user_input", { session_id: "abc.def", message: "hi" });
      // A reply topic below the session's own is the requester's to name, but not with a '.'.
      await client.send("maze/user_input", {
        session_id: "abc",
        message: "hi",
        reply_topic: "maze/assistant_response/abc/v1.2",
      });
      // White space is refused in every session id, whatever the broker.
      await client.send("maze/user_input", { session_id: "with space", message: "hi" });
      // A game state whose hint topic has a '.' is refused before its turn runs.
      await client.send("maze/state", { sessionId: "abc.def", player_pos: [1, 1] });
      const finals = await pings(client, "maze");
      ok(finals.every((m) => m.json!.type === "done"));
      // Logged once a minute: the two after the first are left out of the log.
      match(log(), /session abc\.def: its reply topic .* cannot be used: .*NATS/);
      equal(log().match(/its reply topic .* cannot be used/g)?.length, 1);
      match(log(), /Unanswerable request on maze\/user_input: 'session_id'.*white space/);
      // Had the state's turn run, its hint would have been dropped on the way out.
      ok(!log().includes("Reply to maze/hint/abc.def not sent"), "the state's turn never ran");
      ok(!log().includes("Lost the connection"), "the broker never dropped the service");
    }),
});

Deno.test({
  name: "NATS: --share-group refuses to start, saying the broker has no shared subscriptions",
  ignore: !HAS_NATS,
  fn: async () => {
    const nats = await startNats();
    const dataDir = await tempDir("vllm-mqtt-data-");
    try {
      const service = await startService([
        "--engine=sim",
        `--mqtt-url=${nats.url}`,
        `--data-dir=${dataDir}`,
        "--projects=maze",
        "--workers=1",
        "--share-group=pool",
        "--mqtt-client-id=member-1",
      ], { expectExit: true, timeoutMs: 60_000 });
      const code = await service.stop();
      equal(code, 1);
      match(service.log(), /--share-group pool cannot work on this broker: .*shared subscriptions/);
    } finally {
      await nats.close();
      await removeTempDir(dataDir);
    }
  },
});

Deno.test({
  name: "mosquitto, MQTT 3.1.1: the shared-subscription probe passes and the group serves",
  ignore: !HAS_MOSQUITTO,
  fn: () =>
    withService(
      { args: ["--mqtt-version=4", "--share-group=pool"] },
      async ({ client }) => {
        const finals = await pings(client, "maze", 3);
        ok(finals.every((m) => m.json!.type === "done"));
      },
    ),
});

/** How many final replies a request got (after a moment for a second copy to show). */
async function finalsOf(client: TestClient, sessionId: string, requestId: string) {
  await client.final(sessionId, requestId);
  await new Promise((resolve) => setTimeout(resolve, 300));
  return client.received.filter((m) =>
    m.json?.session_id === sessionId && m.json.request_id === requestId &&
    (m.json.type === "done" || m.json.type === "error")
  );
}

for (const version of ["5", "4"]) {
  Deno.test({
    name:
      `MQTT ${version}: a run inherits no subscription of an earlier run with other options; each request answered once`,
    ignore: !HAS_MOSQUITTO,
    fn: () =>
      withService(
        { args: ["--answer-unknown-projects", `--mqtt-version=${version}`] },
        async (fixture) => {
          const { client } = fixture;
          await client.subscribe("racing/assistant_response/#");
          // The first run answers every project; the next one only its own.
          await fixture.service.stop();
          const narrow = fixture.args.filter((arg) => arg !== "--answer-unknown-projects");
          // Sent while no service runs: the broker keeps them for the persistent session.
          await client.send("maze/user_input", {
            session_id: "queued",
            request_id: "q1",
            message: "hi",
          });
          fixture.service = await startService(narrow);
          equal((await finalsOf(client, "queued", "q1")).length, 1);
          await client.send("racing/user_input", {
            session_id: "r",
            request_id: "r1",
            message: "hi",
          });
          await client.send("maze/user_input", {
            session_id: "n",
            request_id: "n1",
            message: "hi",
          });
          const once = await finalsOf(client, "n", "n1");
          equal(once.length, 1);
          equal(once[0].json!.type, "done");
          equal(client.received.filter((m) => m.json?.session_id === "r").length, 0);
          // And back: the wide run has the specific filters of the narrow one left over.
          await fixture.service.stop();
          fixture.service = await startService(fixture.args);
          await client.send("maze/user_input", {
            session_id: "w",
            request_id: "w1",
            message: "hi",
          });
          equal((await finalsOf(client, "w", "w1")).length, 1);
          await client.send("racing/user_input", {
            session_id: "r",
            request_id: "r2",
            message: "hi",
          });
          const unknown = await finalsOf(client, "r", "r2");
          equal(unknown.length, 1);
          equal((unknown[0].json!.error as { code: string }).code, "unknown_project");
        },
      ),
  });
}

Deno.test({
  name:
    "RabbitMQ 3.10: MQTT 5 closed unanswered, the service says so and serves with 3.1.1; --share-group refused",
  ignore: !HAS_RABBITMQ,
  fn: async () => {
    const rabbit = await startRabbitMq();
    try {
      await withBroker(() => Promise.resolve({ ...rabbit, close: async () => {} }), [], async (
        client,
        log,
      ) => {
        match(log(), /does not take MQTT 5 \(it closed the connection unanswered\)/);
        const finals = await pings(client, "maze", 5);
        ok(finals.every((m) => m.json!.type === "done"));
      });
      const dataDir = await tempDir("vllm-mqtt-data-");
      const service = await startService([
        "--engine=sim",
        `--mqtt-url=${rabbit.url}`,
        `--data-dir=${dataDir}`,
        "--projects=maze",
        "--workers=1",
        "--share-group=pool",
        "--mqtt-client-id=member-1",
      ], { expectExit: true, timeoutMs: 60_000 });
      equal(await service.stop(), 1);
      match(service.log(), /--share-group pool cannot work on this broker/);
      await removeTempDir(dataDir);
    } finally {
      await rabbit.close();
    }
  },
});

Deno.test({
  name:
    "a run stopped while the broker was down does not make the next run stop at a broker restart",
  ignore: !HAS_MOSQUITTO,
  fn: async () => {
    const store = await tempDir("vllm-mqtt-broker-store-");
    // mosquitto started as root runs as its own user: it must be able to save its sessions.
    await Deno.chmod(store, 0o777);
    try {
      await withService({
        brokerConfig: ["persistence true", `persistence_location ${store}/`],
      }, async (fixture) => {
        const { broker, client } = fixture;
        // Stopped while the broker is down: no `offline` replaces its retained `online`.
        await broker.stop("SIGTERM");
        equal(await fixture.service.stop(), 0);
        await broker.start();
        fixture.service = await startService(fixture.args);
        const next = fixture.service;
        await client.send("maze/user_input", { session_id: "a", request_id: "1", message: "hi" });
        equal((await client.final("a", "1", 30_000)).json!.type, "done");
        // The broker restarts: the service reconnects and serves on.
        await broker.stop("SIGTERM");
        await broker.start();
        await waitFor(() => next.log().includes("Reconnected") || next.exited(), 20_000);
        await new Promise((resolve) => setTimeout(resolve, 2500));
        ok(!next.exited(), `the service stopped:\n${next.log().slice(-1500)}`);
        await client.send("maze/user_input", { session_id: "a", request_id: "2", message: "hi" });
        equal((await client.final("a", "2", 30_000)).json!.type, "done");
      });
    } finally {
      await removeTempDir(store);
    }
  },
});

Deno.test({
  name: "--log-level debug logs each request's path: parsed, queued, started, answered",
  ignore: !HAS_MOSQUITTO,
  fn: () =>
    withService({ args: ["--log-level=debug"] }, async ({ client, service }) => {
      await client.send("maze/user_input", { session_id: "d", request_id: "dbg", message: "hi" });
      await client.final("d", "dbg");
      await waitFor(() => service.log().includes("Request dbg of maze/d: answered in"));
      for (const step of ["parsed, on maze/user_input", "admitted and queued", "started after"]) {
        ok(service.log().includes(`Request dbg of maze/d: ${step}`), step);
      }
    }),
});

Deno.test({
  name: "a broker that drops requests for a full queue: the service logs what the broker counts",
  ignore: !HAS_MOSQUITTO,
  fn: () =>
    withService({
      args: ["--mqtt-version=4", "--rate-limit=0"],
      brokerConfig: ["max_queued_messages 5", "sys_interval 1"],
    }, async ({ client, service }) => {
      // A burst faster than the service reads: the broker's queue for it overflows.
      await Promise.all(
        Array.from({ length: 300 }, (_, i) =>
          client.send("maze/user_input", { session_id: `b${i}`, message: "hi" })),
      );
      await waitFor(
        () =>
          /The broker dropped \d+ messages/.test(service.log()),
        15_000,
        "the drop to be logged",
      );
    }),
});

Deno.test("the embedded broker: its start-up line says MQTT 5 clients are refused, as they are; no share group", async () => {
  const dataDir = await tempDir("vllm-mqtt-data-");
  const port = freePort();
  const args = [
    "--engine=sim",
    `--embedded-broker-port=${port}`,
    `--data-dir=${dataDir}`,
    "--projects=maze",
  ];
  const service = await startService(args);
  try {
    match(service.log(), /embedded broker there \(MQTT 3\.1\.1 only: it refuses MQTT 5 clients/);
    const refused = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
      protocolVersion: 5,
      reconnectPeriod: 0,
    }).then((client) => client.endAsync().then(() => "accepted"), (error: Error) => error.message);
    match(refused, /Unacceptable protocol version/);
  } finally {
    equal(await service.stop(), 0);
  }
  // aedes has no shared subscriptions: a share group would split nothing.
  const member = await startService([...args, "--share-group=pool", "--mqtt-client-id=m1"], {
    expectExit: true,
    timeoutMs: 60_000,
  });
  equal(await member.stop(), 1);
  match(member.log(), /--share-group pool cannot work on this broker/);
  await removeTempDir(dataDir);
});

Deno.test({
  name: "NATS: requests sent while the service is down are answered when it is back",
  ignore: !HAS_NATS,
  fn: async () => {
    const nats = await startNats();
    const dataDir = await tempDir("vllm-mqtt-data-");
    const args = [
      "--engine=sim",
      `--mqtt-url=${nats.url}`,
      `--data-dir=${dataDir}`,
      "--projects=maze",
      "--workers=1",
    ];
    const client = await TestClient.connect(nats.url, { protocolVersion: 4 });
    let service = await startService(args);
    try {
      await client.subscribe("maze/assistant_response/#");
      equal(await service.stop(), 0);
      for (let i = 0; i < 10; i++) {
        await client.send("maze/user_input", {
          session_id: `q${i}`,
          request_id: "q",
          message: "hi",
        });
      }
      service = await startService(args);
      for (let i = 0; i < 10; i++) equal((await client.final(`q${i}`, "q")).json!.type, "done");
    } finally {
      await client.close();
      await service.stop();
      await nats.close();
      await removeTempDir(dataDir);
    }
  },
});
