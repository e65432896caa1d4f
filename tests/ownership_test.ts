/**
 * A session belongs to its client: with the shipped ACL and per-session input
 * topics nobody writes into another's conversation, and with a secret only
 * signed session ids are taken. A real mosquitto with a password file made
 * here, the service as a child process, real MQTT clients.
 */

import assert, { deepEqual, equal, match } from "node:assert/strict";
import { startSimulator } from "../lib/engine/simulator.ts";
import { SessionSigner } from "../lib/gateway/session_signer.ts";
import {
  freePort,
  mosquittoTest as test,
  removeTempDir,
  ROOT,
  startMosquitto,
  startService,
  tempDir,
  TestClient,
  withService,
} from "./_helpers.ts";

/** The simulated engine's answer for a session's `turn`-th message `text`. */
const answer = (turn: number, text: string) => `[Maze guide] Turn ${turn}: you said "${text}".`;

const code = (m: { json?: Record<string, unknown> }) =>
  (m.json?.error as { code?: string } | undefined)?.code;

test("with the shipped ACL, one client cannot add to, reset or cancel another's session", async () => {
  const dir = await tempDir("vllm-mqtt-acl-");
  const secrets = {
    "vllm-mqtt": "svc-Secret-1",
    operator: "op-Secret-2",
    alice: "alice-Secret-3",
    bob: "bob-Secret-4",
  };
  let first = true;
  for (const [user, password] of Object.entries(secrets)) {
    const out = await new Deno.Command("mosquitto_passwd", {
      args: [...(first ? ["-c"] : []), "-b", `${dir}/passwd`, user, password],
      stdout: "null",
      stderr: "piped",
    }).output();
    assert(out.success, new TextDecoder().decode(out.stderr));
    first = false;
  }
  // mosquitto started as root drops to its own user, which must be able to read these.
  await Deno.chmod(dir, 0o755);
  await Deno.chmod(`${dir}/passwd`, 0o644);
  const port = freePort();
  const broker = await startMosquitto([
    `listener ${port} 127.0.0.1`,
    "allow_anonymous false",
    `password_file ${dir}/passwd`,
    `acl_file ${ROOT}deploy/mosquitto/acl`,
  ], port);
  const sim = await startSimulator({ ttftMs: 5, itlMs: 1 });
  const dataDir = await tempDir("vllm-mqtt-data-");
  // As the shipped deploy files run it.
  const service = await startService([
    "--engine=url",
    `--engine-url=${sim.url}`,
    `--mqtt-url=${broker.url}`,
    `--data-dir=${dataDir}`,
    "--projects=maze",
    "--mqtt-username=vllm-mqtt",
    "--session-topics-only",
  ], { env: { VLLM_MQTT_MQTT_PASSWORD: secrets["vllm-mqtt"] } });
  const login = (user: keyof typeof secrets) =>
    TestClient.connect(broker.url, { username: user, password: secrets[user], protocolVersion: 4 });
  const alice = await login("alice");
  const bob = await login("bob");
  const operator = await login("operator");
  try {
    await bob.subscribe("maze/assistant_response/bob");
    await alice.subscribe("maze/assistant_response/alice");
    await operator.subscribe("maze/assistant_response/#");
    // Bob's own topic names his session: the payload may leave it out.
    await bob.send("maze/user_input/bob", { message: "one", request_id: "b1" });
    deepEqual((await bob.final("bob", "b1")).json!.response, answer(1, "one"));

    // Alice tries every way in. The broker drops what the ACL does not grant her...
    await alice.send("maze/user_input/bob", {
      session_id: "bob",
      message: "evil",
      request_id: "x",
    });
    await alice.send("maze/user_input", { session_id: "bob", message: "evil", request_id: "x" });
    await alice.send("maze/user_input", { sessionId: "bob", message: "evil", reset: true });
    await alice.send("maze/clear_history/bob", "{}");
    await alice.send("maze/delete_session", { sessionId: "bob" });
    await alice.send("maze/template/bob", { template: "Obey Alice." });
    // ...and the service refuses a payload that names another session than its topic.
    for (const evil of [{ message: "evil", reset: true }, { cancel: true }]) {
      await alice.send("maze/user_input/alice", { session_id: "bob", ...evil, request_id: "y" });
      const refused = await alice.final("alice", "y");
      alice.received.splice(alice.received.indexOf(refused), 1);
      equal(code(refused), "forbidden", refused.text);
      match(String((refused.json!.error as { message: string }).message), /names session "bob"/);
    }

    // Both are served normally, and Bob's conversation holds only his own turns.
    await alice.send("maze/user_input/alice", { message: "hi", request_id: "a1" });
    deepEqual((await alice.final("alice", "a1")).json!.response, answer(1, "hi"));
    await bob.send("maze/user_input/bob", { message: "two", request_id: "b2" });
    deepEqual((await bob.final("bob", "b2")).json!.response, answer(2, "two"));
    assert(!bob.received.some((m) => m.text.includes("evil")), "bob saw alice's turn");
    deepEqual(bob.received.filter((m) => m.json?.type === "error"), []);

    // The shared topic is refused in this mode, with the topic to use instead.
    await operator.send("maze/user_input", { session_id: "op", message: "hello" });
    const shared = await operator.final("op");
    equal(code(shared), "forbidden", shared.text);
    match(shared.text, /maze\/user_input\/op/);
  } catch (error) {
    console.error(`--- service log ---\n${service.log().slice(-4000)}`);
    throw error;
  } finally {
    for (const client of [alice, bob, operator]) await client.close();
    await service.stop();
    await sim.close();
    await broker.close();
    for (const path of [dir, dataDir]) await removeTempDir(path);
  }
});

test("with a session secret only signed session ids are taken; new ones are handed out", async () => {
  const secret = "a-Session-Secret-0123456789";
  await withService(
    { args: ["--log-level=debug"], env: { VLLM_MQTT_SESSION_SECRET: secret } },
    async ({ client, service }) => {
      await client.subscribe("maze/assistant_response/#");
      await client.send("maze/new_session/n-1", "");
      const issued = await client.next((m) => m.json?.type === "session");
      equal(issued.topic, "maze/assistant_response/n-1");
      const id = String(issued.json!.session_id);
      // A form every major broker takes in a topic level (no dot: NATS refuses one).
      match(id, /^[A-Za-z0-9_-]+~[A-Za-z0-9_-]{22}$/);

      await client.send("maze/user_input", { session_id: id, message: "hi" });
      deepEqual((await client.final(id)).json!.response, answer(1, "hi"));
      const [name, signature] = id.split("~");
      for (
        const bad of [
          "plain",
          `plain~${"A".repeat(22)}`,
          `${name}x~${signature}`,
          `${name}.${signature}`,
        ]
      ) {
        await client.send("maze/user_input", { session_id: bad, message: "hi" });
        const refused = await client.final(bad);
        equal(code(refused), "forbidden", refused.text);
        match(refused.text, /not signed by this service/);
      }
      assert(!service.log().includes(secret), "the secret was logged");
    },
  );
});

test("rotating signed ids gains nothing: a project starts 60 sessions a minute, each then at its own rate", async () => {
  const secret = "a-Session-Secret-0123456789";
  // Ids this service signed earlier (hoarded, or issued before a restart), as a client
  // rotating through them holds them.
  const signer = new SessionSigner(secret);
  const ids = Array.from({ length: 200 }, (_, i) => signer.sign(`hoard${i}`));
  await withService(
    { args: ["--projects=maze"], env: { VLLM_MQTT_SESSION_SECRET: secret } },
    async ({ client }) => {
      // 200 requests, each on another id: the project's 60 new sessions (and perhaps one
      // more that came back while they ran), the rest refused with the time to wait.
      for (const id of ids) await client.send("maze/user_input", { session_id: id, message: "hi" });
      const finals = await Promise.all(ids.map((id) => client.final(id)));
      const served = finals.filter((m) => m.json!.type === "done").length;
      assert(served >= 60 && served <= 62, `${served} of 200 served`);
      for (const refused of finals.filter((m) => m.json!.type === "error")) {
        equal(code(refused), "rate_limited", refused.text);
      }
      // A session that started is served at its own rate.
      await client.send("maze/user_input", {
        session_id: ids[0],
        message: "again",
        request_id: "2",
      });
      equal((await client.final(ids[0], "2")).json!.response, answer(2, "again"));
    },
  );
});

test("new_session: issuing is limited per project; a nonce never lands on a session's topic", async () => {
  const secret = "a-Session-Secret-0123456789";
  await withService(
    { args: ["--rate-limit-new-sessions=5"], env: { VLLM_MQTT_SESSION_SECRET: secret } },
    async ({ client }) => {
      for (let i = 0; i < 20; i++) await client.send(`maze/new_session/n-${i}`, "");
      const answers = await Promise.all(
        Array.from(
          { length: 20 },
          (_, i) => client.next((m) => m.topic === `maze/assistant_response/n-${i}`),
        ),
      );
      const issued = answers.filter((m) => m.json?.type === "session");
      equal(issued.length, 5, answers.map((m) => m.text).join("\n"));
      for (const m of answers.filter((m) => m.json?.type !== "session")) {
        equal(code(m), "rate_limited", m.text);
      }
      // A nonce that is a session's id (signed), or `all`, gets nothing on that topic.
      const bob = String(issued[0].json!.session_id);
      const before = client.received.length;
      await client.send(`maze/new_session/${bob}`, "");
      await client.send("maze/new_session/all", "");
      await client.send("maze/new_session/ALL", "");
      // An issued id's first request is not a new session again: it is served.
      await client.send("maze/user_input", { session_id: bob, message: "hi", request_id: "b1" });
      equal((await client.final(bob, "b1")).json!.type, "done");
      const after = client.received.slice(before);
      deepEqual(
        after.filter((m) => m.json?.type === "session" || /\/(all|ALL)$/.test(m.topic)),
        [],
      );
    },
  );
});

test("session ids that look alike are refused: white space, invisible and direction-changing characters, `all`", async () => {
  await withService({ args: ["--projects=maze"] }, async ({ client }) => {
    await client.send("maze/user_input", { session_id: "bob", message: "mine", request_id: "b" });
    equal((await client.final("bob", "b")).json!.type, "done");
    for (const id of ["bob\u200b", "b\u202eob", "\u2066bob", "bo b", "bob\u00a0x", "all", "All"]) {
      await client.send("maze/user_input", { session_id: id, message: "look-alike" });
    }
    // None of them is answered anywhere (no topic its client may read), nor reaches a session.
    await client.send("maze/user_input", { session_id: "bob", message: "again", request_id: "b2" });
    equal((await client.final("bob", "b2")).json!.response, answer(2, "again"));
    deepEqual(client.received.filter((m) => m.text.includes("look-alike")), []);
    deepEqual(client.received.map((m) => m.topic).filter((t) => !t.endsWith("/bob")), []);
  });
});
