/**
 * A/B tests of model versions, end to end: a real mosquitto, the service as a
 * child process (one, restarted on its data folder, or two in a share group),
 * the simulated engine over HTTP signing each answer with the model and the
 * system prompt it got. Sessions are split by the weights and keep their
 * variant for every turn, across a restart, two instances and a weight change;
 * replies name the variant; feedback is stored once per request_id and only
 * for the session's own requests; a request chooses its variant only where
 * allowed; the operator ends an experiment or stops a variant over HTTP.
 */

import assert, { deepEqual, equal, match, notEqual } from "node:assert/strict";
import { join } from "node:path";
import { startSimulator } from "../lib/engine/simulator.ts";
import { SessionSigner } from "../lib/gateway/session_signer.ts";
import {
  freePort,
  type Mosquitto,
  mosquittoTest as test,
  type Received,
  removeTempDir,
  type ServiceProcess,
  startMosquitto,
  startService,
  tempDir,
  TestClient,
  waitFor,
} from "./_helpers.ts";

const ADAPTER = "maze-lora-v2";

/** The project file: `a` as the project is, `b` on the adapter with a prompt file of its own. */
function mazeFile(weights: { a: number; b: number }, extra = ""): string {
  return [
    "---",
    "experiment: maze-lora-2026-12",
    "state_topic: true",
    "hint_topic: true",
    "response_format:",
    "  name: maze_hint",
    "  schema: { type: object, properties: { hint: { type: string } }, required: [hint] }",
    extra,
    "variants:",
    "  - name: a",
    `    weight: ${weights.a}`,
    "  - name: b",
    `    weight: ${weights.b}`,
    `    model: ${ADAPTER}`,
    "    prompt: maze_b.txt",
    "---",
    "# Maze guide",
    "Guide the player through the maze.",
    "",
  ].filter((line) => line !== "").join("\n");
}

/** What the simulated engine's signature says of an answer: the model and the prompt's hash. */
function signature(text: string): { model: string; prompt: string; good: boolean } {
  const found = /<sim model=(\S+) prompt=([0-9a-f]{8}) quality=\S+ outcome=(good|bad)>/.exec(text);
  assert(found, `no signature in ${text}`);
  return { model: found[1], prompt: found[2], good: found[3] === "good" };
}

interface Setup {
  readonly broker: Mosquitto;
  readonly client: TestClient;
  readonly promptsDir: string;
  readonly dataDir: string;
  readonly engineUrl: string;
  /** Starts an instance with the fixture's broker, engine, prompts and data folder. */
  readonly start: (extra?: string[], env?: Record<string, string>) => Promise<ServiceProcess>;
}

/** Runs `fn` with a broker, a simulated engine serving the adapter, a prompts and a data folder. */
async function withSetup(
  weights: { a: number; b: number },
  fn: (setup: Setup) => Promise<void>,
  extra = "",
): Promise<void> {
  const broker = await startMosquitto();
  const sim = await startSimulator({
    ttftMs: 2,
    itlMs: 0,
    adapters: [ADAPTER],
    quality: { "sim-model": 0.8, [ADAPTER]: 0.4 },
  });
  const promptsDir = await tempDir("vllm-mqtt-prompts-");
  const dataDir = await tempDir("vllm-mqtt-data-");
  await Deno.writeTextFile(join(promptsDir, "maze.md"), mazeFile(weights, extra));
  await Deno.writeTextFile(join(promptsDir, "maze_b.txt"), "# Maze guide B\nBe brief.\n");
  await Deno.writeTextFile(join(promptsDir, "general.md"), "You are a helpful assistant.\n");
  const started: ServiceProcess[] = [];
  const client = await TestClient.connect(broker.url);
  await client.subscribe(["maze/assistant_response/#", "general/assistant_response/#"]);
  const start = async (more: string[] = [], env: Record<string, string> = {}) => {
    const service = await startService([
      "--engine=url",
      `--engine-url=${sim.url}`,
      `--mqtt-url=${broker.url}`,
      `--data-dir=${dataDir}`,
      `--prompts-dir=${promptsDir}`,
      "--projects=maze,general",
      "--rate-limit=0",
      `--mqtt-client-id=svc-${crypto.randomUUID()}`,
      ...more,
    ], { env });
    started.push(service);
    return service;
  };
  try {
    await fn({ broker, client, promptsDir, dataDir, engineUrl: sim.url, start });
  } catch (error) {
    for (const service of started) {
      console.error(`--- service log ---\n${service.log().slice(-3000)}`);
    }
    throw error;
  } finally {
    await client.close();
    for (const service of started) await service.stop();
    await sim.close();
    await broker.close();
    await removeTempDir(promptsDir);
    await removeTempDir(dataDir);
  }
}

/** Sends a turn and returns its `done`, checked to be answered by the variant the reply names. */
async function turn(
  client: TestClient,
  sessionId: string,
  requestId: string,
  extra: Record<string, unknown> = {},
): Promise<{ variant: string; reply: Received }> {
  await client.send("maze/user_input", {
    session_id: sessionId,
    request_id: requestId,
    message: `turn ${requestId}`,
    ...extra,
  });
  const reply = await client.final(sessionId, requestId, 30_000);
  equal(reply.json!.type, "done", reply.text);
  const variant = reply.json!.variant as string;
  const { model } = signature(reply.json!.response as string);
  equal(model, variant === "b" ? ADAPTER : "sim-model", `${variant} answered by ${model}`);
  return { variant, reply };
}

test("a 90/10 experiment: sessions split by the weights, each answered by its one variant", async () => {
  await withSetup({ a: 90, b: 10 }, async ({ client, start }) => {
    await start();
    const ids = Array.from({ length: 200 }, (_, i) => `split-${i}`);
    const first = new Map<string, { variant: string; prompt: string }>();
    await Promise.all(ids.map(async (id) => {
      const { variant, reply } = await turn(client, id, "1");
      first.set(id, { variant, prompt: signature(reply.json!.response as string).prompt });
    }));
    const b = [...first.values()].filter((v) => v.variant === "b").length;
    // 200 sessions at 10 %: mean 20, standard deviation 4.2; four of them either side.
    assert(b >= 4 && b <= 37, `${b} of 200 sessions on b`);
    // b has its own system prompt: the engine saw another prompt.
    const prompts = new Set([...first.values()].map((v) => `${v.variant}:${v.prompt}`));
    equal(prompts.size, 2, [...prompts].join(" "));
    // Every later turn of a session: the same variant.
    await Promise.all(
      ids.slice(0, 60).map(async (id) => {
        for (const requestId of ["2", "3"]) {
          equal((await turn(client, id, requestId)).variant, first.get(id)!.variant);
        }
      }),
    );
    // A game's state turn: its hint names the session's variant, and that variant answered.
    await client.subscribe("maze/hint/#");
    const onB = ids.find((id) => first.get(id)!.variant === "b")!;
    for (const id of [ids.find((id) => first.get(id)!.variant === "a")!, onB]) {
      await client.send(`maze/state/${id}`, {
        player_pos: [1, 1],
        exit_pos: [3, 3],
        visible_map: [[0, 0, 0], [0, 1, 1], [0, 1, 0]],
      });
      const hint = await client.next((m) => m.topic === `maze/hint/${id}`, 30_000);
      equal(hint.json!.variant, first.get(id)!.variant, hint.text);
      const { model } = signature(hint.json!.hint as string);
      equal(model, first.get(id)!.variant === "b" ? ADAPTER : "sim-model");
    }
    // A project without an experiment answers as before: no variant field.
    await client.send("general/user_input", { session_id: "plain", message: "hi" });
    const plain = await client.final("plain");
    equal(plain.json!.type, "done");
    equal("variant" in plain.json!, false);
    // The original's plain-text replies are unchanged: no signature of a variant in them.
    await client.subscribe("maze/assistant_response/text-client");
    await client.send("maze/user_input", { sessionId: "text-client", message: "hello" });
    const text = await client.next((m) => m.topic === "maze/assistant_response/text-client");
    equal(text.json, undefined, text.text);
    match(text.text, /Turn 1: you said "hello"/);
  });
});

test("a session keeps its variant across a restart and a weight change; new ones follow the new weights", async () => {
  await withSetup({ a: 50, b: 50 }, async ({ client, start, promptsDir }) => {
    let service = await start();
    const ids = Array.from({ length: 40 }, (_, i) => `kept-${i}`);
    const first = new Map<string, string>();
    await Promise.all(ids.map(async (id) => first.set(id, (await turn(client, id, "1")).variant)));
    assert(new Set(first.values()).size === 2, "both variants have sessions");
    await service.stop();
    // Every new session to a now.
    await Deno.writeTextFile(join(promptsDir, "maze.md"), mazeFile({ a: 1, b: 0 }));
    service = await start();
    await Promise.all(ids.map(async (id) => {
      equal((await turn(client, id, "2")).variant, first.get(id), `session ${id}`);
    }));
    for (let i = 0; i < 20; i++) equal((await turn(client, `fresh-${i}`, "1")).variant, "a");
  });
});

test("two instances of a share group answer each session with its one variant", async () => {
  await withSetup({ a: 50, b: 50 }, async ({ client, start }) => {
    const ports = [freePort(), freePort()];
    await Promise.all(
      ["x", "y"].map((name, i) =>
        start([`--share-group=ab`, `--mqtt-client-id=ab-${name}`, `--http-port=${ports[i]}`])
      ),
    );
    const ids = Array.from({ length: 30 }, (_, i) => `shared-${i}`);
    const seen = new Map<string, Set<string>>();
    await Promise.all(ids.map(async (id) => {
      const variants = new Set<string>();
      // Sent at once: the turns land on both instances, the first on either.
      const sent = ["1", "2", "3", "4"].map((requestId) =>
        client.send("maze/user_input", { session_id: id, request_id: requestId, message: "go" })
      );
      await Promise.all(sent);
      for (const requestId of ["1", "2", "3", "4"]) {
        const reply = await client.final(id, requestId, 30_000);
        equal(reply.json!.type, "done", reply.text);
        const variant = reply.json!.variant as string;
        equal(
          signature(reply.json!.response as string).model,
          variant === "b" ? ADAPTER : "sim-model",
        );
        variants.add(variant);
      }
      seen.set(id, variants);
    }));
    for (const [id, variants] of seen) equal(variants.size, 1, `${id}: ${[...variants]}`);
    const onB = ids.filter((id) => seen.get(id)!.has("b"));
    assert(onB.length > 0 && onB.length < 30, `${onB.length} of 30 on b`);
    // Stopped on one instance: the other reads it from the store, and b's sessions move to a
    // wherever their turns land.
    const stop = await fetch(`http://127.0.0.1:${ports[0]}/operator/experiments/maze`, {
      method: "POST",
      body: JSON.stringify({ stop: "b", reason: "test" }),
    });
    equal(stop.status, 200, await stop.text());
    await waitFor(
      async () => {
        const state = await fetch(`http://127.0.0.1:${ports[1]}/operator/experiments/maze`);
        return ((await state.json()).control?.stopped ?? []).includes("b");
      },
      10_000,
      "the other instance to read the stop",
    );
    await Promise.all(onB.map(async (id) => {
      for (const requestId of ["5", "6"]) {
        await client.send("maze/user_input", {
          session_id: id,
          request_id: requestId,
          message: "go",
        });
        const reply = await client.final(id, requestId, 30_000);
        equal(reply.json!.variant, "a", reply.text);
        equal(signature(reply.json!.response as string).model, "sim-model");
      }
    }));
  });
});

const code = (m: Received) => (m.json?.error as { code?: string } | undefined)?.code;

test("feedback: stored and counted once per request_id, refused for a request the session did not make", async () => {
  await withSetup({ a: 50, b: 50 }, async ({ client, start }) => {
    const port = freePort();
    await start([`--http-port=${port}`]);
    const { variant } = await turn(client, "fb", "r1");
    await turn(client, "other", "r9");
    const acks = (requestId: string) =>
      client.received.filter((m) =>
        m.topic === "maze/assistant_response/fb" && m.json?.type === "feedback" &&
        m.json.request_id === requestId
      );
    await client.send("maze/feedback/fb", {
      request_id: "r1",
      score: 1,
      label: "solved in 12 moves",
    });
    await waitFor(() => acks("r1").length === 1, 10_000, "the feedback's acknowledgement");
    equal(acks("r1")[0].json!.accepted, true);
    equal(acks("r1")[0].json!.variant, variant);
    equal("duplicate" in acks("r1")[0].json!, false);
    // The same request_id again: acknowledged as a duplicate, not counted.
    await client.send("maze/feedback/fb", { request_id: "r1", score: 0 });
    await waitFor(() => acks("r1").length === 2, 10_000, "the repeat's acknowledgement");
    equal(acks("r1")[1].json!.duplicate, true);
    const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    match(
      metrics,
      new RegExp(`vllm_mqtt_feedback_total\\{project="maze",variant="${variant}"\\} 1\\n`),
    );
    match(
      metrics,
      new RegExp(`vllm_mqtt_feedback_score_sum\\{project="maze",variant="${variant}"\\} 1\\n`),
    );
    // Another session's request, a request never made, bad payloads: each a clear error.
    const errors = (n: number) =>
      waitFor(
        () =>
          client.received.filter((m) =>
            m.topic === "maze/assistant_response/fb" && m.json?.type === "error"
          ).length >= n,
        10_000,
        `${n} error replies`,
      );
    await client.send("maze/feedback/fb", { request_id: "r9", score: 1 });
    await errors(1);
    await client.send("maze/feedback/fb", { request_id: "r1", score: "great" });
    await errors(2);
    await client.send("maze/feedback/fb", "not json");
    await errors(3);
    await client.send("maze/feedback/fb", { request_id: "r1", scroe: 1 });
    await errors(4);
    // A score sum is a counter on /metrics: a negative score would break its rate().
    await client.send("maze/feedback/fb", { request_id: "r1", score: -1 });
    await errors(5);
    const got = client.received.filter((m) =>
      m.topic === "maze/assistant_response/fb" && m.json?.type === "error"
    );
    equal(code(got[0]), "not_found", got[0].text);
    match((got[0].json!.error as { message: string }).message, /made no request "r9"/);
    equal(code(got[1]), "invalid_request", got[1].text);
    equal(code(got[2]), "invalid_request", got[2].text);
    match(got[3].text, /'scroe' is not a feedback field/);
    equal(code(got[4]), "invalid_request", got[4].text);
    match(got[4].text, /'score' must be a finite number, 0 or more/);
    // Still one stored: the metrics did not move, and the service answers turns as before.
    const after = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    match(
      after,
      new RegExp(`vllm_mqtt_feedback_total\\{project="maze",variant="${variant}"\\} 1\\n`),
    );
    equal((await turn(client, "fb", "r2")).variant, variant);
  });
});

test("feedback under signed session ids: an id this service did not sign is refused", async () => {
  const secret = "an-Experiment-Secret-0123456789";
  await withSetup({ a: 50, b: 50 }, async ({ client, start }) => {
    await start([], { VLLM_MQTT_SESSION_SECRET: secret });
    const signer = new SessionSigner(secret);
    const own = signer.sign("alice");
    await turn(client, own, "r1");
    await client.send(`maze/feedback/${own}`, { request_id: "r1", score: 1 });
    const ack = await client.next((m) => m.json?.type === "feedback" && m.json.session_id === own);
    equal(ack.json!.accepted, true);
    await client.send("maze/feedback/mallory", { request_id: "r1", score: 1 });
    const refused = await client.next((m) =>
      m.topic === "maze/assistant_response/mallory" && m.json?.type === "error"
    );
    equal(code(refused), "forbidden", refused.text);
  });
});

test("a request chooses its variant only where the project allows it", async () => {
  await withSetup({ a: 50, b: 50 }, async ({ client, start, promptsDir }) => {
    let service = await start();
    await client.send("maze/user_input", {
      session_id: "chooser",
      request_id: "1",
      message: "x",
      variant: "b",
    });
    const refused = await client.final("chooser", "1");
    equal(code(refused), "forbidden", refused.text);
    match(refused.text, /allow_variant_request/);
    await service.stop();
    await Deno.writeTextFile(
      join(promptsDir, "maze.md"),
      mazeFile({ a: 100, b: 0 }, "allow_variant_request: true"),
    );
    service = await start();
    for (let i = 0; i < 5; i++) {
      equal((await turn(client, `picked-${i}`, "1", { variant: "b" })).variant, "b");
      // The session keeps it without asking again.
      equal((await turn(client, `picked-${i}`, "2")).variant, "b");
    }
    await client.send("maze/user_input", {
      session_id: "picked-0",
      request_id: "3",
      message: "x",
      variant: "z",
    });
    equal(code(await client.final("picked-0", "3")), "invalid_request");
  });
});

test("the operator stops a variant and ends the experiment over HTTP, with the token; feedback counts for the variant that answered", async () => {
  const token = "an-Operator-Token-0123456789";
  await withSetup({ a: 50, b: 50 }, async ({ client, start }) => {
    const port = freePort();
    await start([`--http-port=${port}`], { VLLM_MQTT_DASHBOARD_TOKEN: token });
    const ids = Array.from({ length: 20 }, (_, i) => `op-${i}`);
    const first = new Map<string, string>();
    await Promise.all(ids.map(async (id) => first.set(id, (await turn(client, id, "1")).variant)));
    const onB = ids.filter((id) => first.get(id) === "b");
    assert(onB.length > 0);
    const post = (body: unknown, auth = token) =>
      fetch(`http://127.0.0.1:${port}/operator/experiments/maze`, {
        method: "POST",
        headers: { authorization: `Bearer ${auth}`, "content-type": "application/json" },
        body: JSON.stringify(body),
      });
    const unauthorized = await post({ stop: "b" }, "wrong-token-0123456789");
    equal(unauthorized.status, 401);
    await unauthorized.body?.cancel();
    const bad = await post({ stop: "c" });
    equal(bad.status, 400);
    match(await bad.text(), /not a variant/);
    const stopped = await post({ stop: "b", reason: "too many errors" });
    equal(stopped.status, 200, await stopped.clone().text());
    equal((await stopped.json()).control.reasons.b, "too many errors");
    // b's sessions now answered by a; a's stay.
    for (const id of ids) equal((await turn(client, id, "2")).variant, "a", id);
    const ended = await post({ winner: "b" });
    equal(ended.status, 200);
    await ended.body?.cancel();
    for (const id of ids) equal((await turn(client, id, "3")).variant, "b", id);
    // A rating of an answer a gave, sent once b won: counted for a, which answered it.
    await client.send(`maze/feedback/${onB[0]}`, { request_id: "2", score: 1 });
    const ack = await client.next((m) => m.json?.type === "feedback");
    equal(ack.json!.variant, "a", ack.text);
    const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    match(metrics, /vllm_mqtt_feedback_total\{project="maze",variant="a"\} 1\n/);
    const state = await fetch(`http://127.0.0.1:${port}/operator/experiments/maze`, {
      headers: { authorization: `Bearer ${token}` },
    });
    const report = await state.json();
    equal(report.control.winner, "b");
    notEqual(report.variants.length, 0);
  });
});

test("the live page's try it is answered by a variant, as a player is, but counted in no figure of the experiment", async () => {
  await withSetup({ a: 50, b: 50 }, async ({ client, start, dataDir }) => {
    const port = freePort();
    const service = await start([`--http-port=${port}`]);
    const player = await turn(client, "player-1", "1");
    const variants = (metrics: string) =>
      [...metrics.matchAll(/^vllm_mqtt_variant_requests_total\{[^}]*\} (\d+)$/gm)]
        .reduce((sum, m) => sum + Number(m[1]), 0);
    const metrics = () => fetch(`http://127.0.0.1:${port}/metrics`).then((r) => r.text());
    equal(variants(await metrics()), 1);
    // Several of the page's sessions, so that both variants are likely to answer one.
    const seen = new Set<string>();
    for (let i = 0; i < 6; i++) {
      const response = await fetch(`http://127.0.0.1:${port}/dashboard/try`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({
          project: "maze",
          session_id: `dashboard-tryit${i}0000`,
          message: "does the new guide help?",
        }),
      });
      equal(response.status, 200);
      const lines = (await response.text()).trim().split("\n").map((line) => JSON.parse(line));
      const done = lines.at(-1);
      equal(done.type, "done", JSON.stringify(done));
      // Answered by its variant, as a player's turn is: the engine got that variant's model.
      assert(done.variant === "a" || done.variant === "b", JSON.stringify(done));
      equal(signature(done.response).model, done.variant === "b" ? ADAPTER : "sim-model");
      seen.add(done.variant);
    }
    // No try-it turn among the experiment's figures: /metrics still counts the one player turn.
    equal(variants(await metrics()), 1, await metrics());
    match(
      await metrics(),
      new RegExp(
        `vllm_mqtt_variant_requests_total\\{project="maze",variant="${player.variant}",outcome="answered"\\} 1\\n`,
      ),
    );
    // Nor among the stored outcomes the report and a restart read.
    await service.stop();
    const kv = await Deno.openKv(join(dataDir, "sessions.kv"));
    try {
      const stored = [];
      for await (const entry of kv.list<{ sessionId: string }>({ prefix: ["outcome", "maze"] })) {
        stored.push(entry.value.sessionId);
      }
      deepEqual(stored, ["player-1"]);
    } finally {
      kv.close();
    }
    assert(seen.size >= 1);
  });
});

test("feedback is rate-limited per session as turns are: a flooding session gets rate_limited, another is served", async () => {
  await withSetup({ a: 50, b: 50 }, async ({ client, start }) => {
    const port = freePort();
    // Later flags win: 6 a minute after a burst of 3, for turns and, apart, for feedback.
    await start([`--http-port=${port}`, "--rate-limit=6", "--rate-limit-burst=3"]);
    await turn(client, "flood", "r1");
    const { variant } = await turn(client, "calm", "r1");
    const on = (session: string) =>
      client.received.filter((m) =>
        m.topic === `maze/assistant_response/${session}` &&
        (m.json?.type === "feedback" || m.json?.type === "error")
      );
    for (let i = 0; i < 10; i++) {
      await client.send("maze/feedback/flood", { request_id: "r1", score: 1 });
    }
    await waitFor(() => on("flood").length === 10, 10_000, "an answer to each of 10 ratings");
    const answers = on("flood");
    // The burst taken (the first stored, the repeats acknowledged as such), the rest refused.
    equal(answers.filter((m) => m.json!.type === "feedback").length, 3);
    const limited = answers.filter((m) => code(m) === "rate_limited");
    equal(limited.length, 7, JSON.stringify(answers.map((m) => m.json)));
    assert(Number((limited[0].json!.error as { retry_after_ms: number }).retry_after_ms) > 0);
    // Another session is served meanwhile: its rating stored, its next turn answered.
    await client.send("maze/feedback/calm", { request_id: "r1", score: 1 });
    await waitFor(() => on("calm").length === 1, 10_000, "the other session's acknowledgement");
    equal(on("calm")[0].json!.accepted, true, on("calm")[0].text);
    equal((await turn(client, "calm", "r2")).variant, variant);
    const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    match(metrics, /vllm_mqtt_requests_total\{project="maze",outcome="rate_limited"\} 7\n/);
  });
});
