/**
 * Several engines behind one service: simulated engines over real HTTP, the
 * service as a child process attached to all of them (`--engine-url` with a
 * list), a real mosquitto and real MQTT clients. Which engine ran a turn is
 * read where it happened: in each simulator's received requests.
 */

import assert, { deepEqual, equal, match } from "node:assert/strict";
import { type Simulator, type SimulatorOptions, startSimulator } from "../lib/engine/simulator.ts";
import {
  freePort,
  mosquittoTest as test,
  type Received,
  removeTempDir,
  ROOT,
  type ServiceProcess,
  startMosquitto,
  startService,
  tempDir,
  TestClient,
  waitFor,
  withServiceOn,
} from "./_helpers.ts";

/** Starts `count` simulators, runs `fn`, closes them. */
async function withSimulators(
  count: number,
  options: SimulatorOptions | ((index: number) => SimulatorOptions),
  fn: (sims: Simulator[]) => Promise<void>,
): Promise<void> {
  const sims = await Promise.all(
    Array.from({ length: count }, (_, i) =>
      startSimulator({
        ttftMs: 5,
        itlMs: 1,
        ...(typeof options === "function" ? options(i) : options),
      })),
  );
  try {
    await fn(sims);
  } finally {
    await Promise.all(sims.map((sim) => sim.close()));
  }
}

/** The last user message of a request body the engine received. */
function lastUserText(body: Record<string, unknown>): string {
  const messages = body.messages as { role: string; content: unknown }[];
  const user = messages.findLast((m) => m.role === "user");
  return typeof user?.content === "string" ? user.content : JSON.stringify(user?.content);
}

/** The indexes of the simulators that received a turn whose message names `session`. */
function enginesOf(sims: readonly Simulator[], session: string): Set<number> {
  const marker = new RegExp(`^${session} `);
  const found = new Set<number>();
  sims.forEach((sim, i) => {
    if (sim.received.some((body) => marker.test(lastUserText(body)))) found.add(i);
  });
  return found;
}

/** Sends one turn and waits for its final reply. */
async function turn(
  client: TestClient,
  session: string,
  n: number,
  extra: Record<string, unknown> = {},
  project = "maze",
): Promise<Received> {
  const requestId = `${session}-${n}`;
  await client.send(`${project}/user_input`, {
    session_id: session,
    request_id: requestId,
    message: `${session} turn ${n}`,
    ...extra,
  });
  return await client.final(session, requestId, 30_000);
}

/** Sends a control command for one session and waits for its acknowledgement. */
async function control(client: TestClient, command: string, session: string): Promise<void> {
  const before = client.received.length;
  await client.send(`maze/${command}/${session}`, "");
  const ack = await client.next((m) =>
    client.received.indexOf(m) >= before && m.topic.endsWith(`/${session}`)
  );
  match(ack.text, /cleared|Deleted/);
}

/** The service's `/metrics`, as text. */
async function metrics(port: number): Promise<string> {
  return await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
}

/** The value of one sample of `/metrics` (0 when absent). */
function sample(text: string, name: string, labels: string): number {
  const line = text.split("\n").find((l) => l.startsWith(`${name}{${labels}}`));
  return line === undefined ? 0 : Number(line.split(" ").at(-1));
}

test("several engines: a session's turns stay on its engine under light load, and sessions spread over the engines", async () => {
  await withSimulators(3, {}, async (sims) => {
    const port = freePort();
    await withServiceOn(
      sims.map((sim) => sim.url).join(","),
      { args: [`--http-port=${port}`] },
      async ({ client }) => {
        const sessions = Array.from({ length: 9 }, (_, i) => `s${i}`);
        for (let n = 1; n <= 3; n++) {
          const replies = await Promise.all(sessions.map((s) => turn(client, s, n)));
          for (const reply of replies) equal(reply.json!.type, "done", reply.text);
        }
        const homes = sessions.map((session) => {
          const engines = enginesOf(sims, session);
          equal(engines.size, 1, `${session} ran on engines ${[...engines]}`);
          return [...engines][0];
        });
        assert(new Set(homes).size >= 2, `every session went to engine ${homes[0]}`);
        const text = await metrics(port);
        const decisions = (reason: string) =>
          [0, 1, 2].reduce(
            (sum, i) =>
              sum +
              sample(text, "vllm_mqtt_route_decisions_total", `engine="e${i}",reason="${reason}"`),
            0,
          );
        deepEqual(
          [decisions("new"), decisions("home"), decisions("moved_for_load")],
          [9, 18, 0],
        );
        // The metrics say where the turns went: as many as each simulator received.
        sims.forEach((sim, i) =>
          equal(sample(text, "vllm_mqtt_engine_turns_total", `engine="e${i}"`), sim.received.length)
        );
        const status = await (await fetch(`http://127.0.0.1:${port}/status`)).json();
        deepEqual(
          status.engine.engines.map((e: { id: string; state: string }) => [e.id, e.state]),
          [["e0", "ready"], ["e1", "ready"], ["e2", "ready"]],
        );
        // A cleared or deleted session holds no prefix on its engine: its next turn is placed
        // anew; a session left alone stays home.
        await control(client, "clear_history", "s0");
        await control(client, "delete_session", "s1");
        for (const s of ["s0", "s1", "s2"]) equal((await turn(client, s, 4)).json!.type, "done");
        const after = await metrics(port);
        const decided = (reason: string) =>
          [0, 1, 2].reduce(
            (sum, i) =>
              sum +
              sample(after, "vllm_mqtt_route_decisions_total", `engine="e${i}",reason="${reason}"`),
            0,
          );
        deepEqual([decided("new"), decided("home"), decided("moved_for_load")], [11, 19, 0]);
      },
    );
  });
});

test("--engine sim --sim-engines 3 --workers 0: three simulated engines, each session kept on one", async () => {
  const broker = await startMosquitto();
  const dataDir = await tempDir("vllm-mqtt-data-");
  const port = freePort();
  const client = await TestClient.connect(broker.url);
  let service: ServiceProcess | undefined;
  try {
    service = await startService([
      "--engine=sim",
      "--sim-engines=3",
      "--sim-ttft=5ms",
      "--sim-itl=1ms",
      // Turns on the gateway's thread: its one turn context holds a client per engine too.
      "--workers=0",
      `--mqtt-url=${broker.url}`,
      `--data-dir=${dataDir}`,
      "--projects=maze",
      `--http-port=${port}`,
    ]);
    await client.subscribe("maze/assistant_response/#");
    const sessions = Array.from({ length: 6 }, (_, i) => `sim${i}`);
    for (let n = 1; n <= 3; n++) {
      const replies = await Promise.all(sessions.map((s) => turn(client, s, n)));
      for (const reply of replies) equal(reply.json!.type, "done", reply.text);
    }
    const text = await metrics(port);
    const per = (name: string, labels: (id: string) => string) =>
      ["e0", "e1", "e2"].map((id) => sample(text, name, labels(id)));
    const sum = (values: number[]) => values.reduce((a, b) => a + b, 0);
    const turns = per("vllm_mqtt_engine_turns_total", (id) => `engine="${id}"`);
    equal(sum(turns), 18);
    assert(turns.filter((n) => n > 0).length >= 2, `all turns on one engine: ${turns}`);
    const decisions = (reason: string) =>
      sum(per("vllm_mqtt_route_decisions_total", (id) => `engine="${id}",reason="${reason}"`));
    deepEqual([decisions("new"), decisions("home"), decisions("moved_for_load")], [6, 12, 0]);
    match(service.log(), /Engine e2: http:\/\/127\.0\.0\.1:\d+\/v1/);
  } finally {
    await client.close();
    await service?.stop();
    await broker.close();
    await removeTempDir(dataDir);
  }
});

test("several engines: a hot engine (a queue of others' requests in its /metrics) sheds new sessions and moves its own", async () => {
  // Prefill one prompt at a time: another tenant's long prompts queue up on engine 0.
  await withSimulators(2, { prefillQueue: true, prefillMsPerToken: 0.5 }, async (sims) => {
    const port = freePort();
    await withServiceOn(
      sims.map((sim) => sim.url).join(","),
      { args: [`--http-port=${port}`, "--projects=maze"] },
      async ({ client }) => {
        // Sessions at once: both engines get some, and both then hold the project's prompt (a
        // new session then goes to either, by its hash).
        const before = Array.from({ length: 8 }, (_, i) => `old${i}`);
        const started = await Promise.all(before.map((session) => turn(client, session, 1)));
        for (const reply of started) equal(reply.json!.type, "done");
        const onHot = before.filter((session) => enginesOf(sims, session).has(0));
        assert(onHot.length > 0, "no session started on engine 0");

        // Another tenant floods engine 0: 40 prompts of ~1,000 tokens, each prefilled in turn
        // (half a second each: a queue of 20 s, ended by the test when it is done).
        const flood = new AbortController();
        const long = "lorem ipsum dolor sit amet ".repeat(200);
        const flooding = Array.from(
          { length: 40 },
          (_, i) =>
            fetch(`${sims[0].url}/chat/completions`, {
              method: "POST",
              headers: { "content-type": "application/json" },
              body: JSON.stringify({
                model: "sim-model",
                messages: [{ role: "user", content: `${i} ${long}` }],
                max_tokens: 4,
                stream: true,
              }),
              signal: flood.signal,
            }).then((r) => r.text()).catch(() => ""),
        );
        try {
          // The service reads each engine's /metrics every 2 s: wait until it saw the queue.
          await waitFor(
            async () => sample(await metrics(port), "vllm_mqtt_engine_waiting", 'engine="e0"') > 5,
            15_000,
            "the service to see engine 0's queue",
          );
          const fresh = Array.from({ length: 8 }, (_, i) => `new${i}`);
          for (const session of fresh) equal((await turn(client, session, 1)).json!.type, "done");
          for (const session of fresh) {
            deepEqual([...enginesOf(sims, session)], [1], `${session} went to the hot engine`);
          }
          // A session at home on the hot engine moves rather than wait behind the queue.
          equal((await turn(client, onHot[0], 2)).json!.type, "done");
          const text = await metrics(port);
          // Still hot when all that was decided: the queue was there for every choice.
          assert(sample(text, "vllm_mqtt_engine_waiting", 'engine="e0"') > 0, text);
          assert(
            sample(
              text,
              "vllm_mqtt_route_decisions_total",
              'engine="e1",reason="moved_for_load"',
            ) >=
              1,
            text,
          );
        } finally {
          flood.abort();
          await Promise.all(flooding);
        }
      },
    );
  });
});

/** An engine in a process of its own (the vLLM stand-in serving the simulator), to kill. */
interface EngineProcess {
  readonly url: string;
  kill(): Promise<void>;
}

async function startEngineProcess(
  port: number,
  env: Record<string, string>,
): Promise<EngineProcess> {
  const record = `${await tempDir("vllm-stand-in-")}/record.json`;
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      `${ROOT}tests/stand_in/vllm_stand_in.ts`,
      "serve",
      "sim-model",
      "--port",
      String(port),
    ],
    env: { ...env, STAND_IN_RECORD: record },
    stdout: "null",
    stderr: "null",
  }).spawn();
  const url = `http://127.0.0.1:${port}/v1`;
  await waitFor(
    () =>
      fetch(`${url}/models`).then(async (r) => {
        await r.body?.cancel();
        return r.ok;
      }, () => false),
    15_000,
    "the engine process to serve",
  );
  const { childPid } = JSON.parse(await Deno.readTextFile(record));
  return {
    url,
    async kill() {
      // SIGKILL, as an engine dies: its connections are cut mid-stream.
      child.kill("SIGKILL");
      await child.status;
      Deno.kill(childPid, "SIGKILL");
    },
  };
}

test("several engines: an engine killed mid-run loses no acknowledged turn; it comes back and takes new sessions", async () => {
  // Slow answers (about a second each), so that the kill finds turns streaming.
  const timing = { ttftMs: 100, itlMs: 60 };
  await withSimulators(2, timing, async (sims) => {
    const port = freePort();
    const enginePort = freePort();
    const env = { STAND_IN_TTFT_MS: "100", STAND_IN_ITL_MS: "60" };
    let engine = await startEngineProcess(enginePort, env);
    // Engine e1 is the process; e0 and e2 the simulators here.
    const urls = [sims[0].url, engine.url, sims[1].url];
    try {
      await withServiceOn(
        urls.join(","),
        { args: [`--http-port=${port}`, "--engine-wait=20s"] },
        async ({ client, service }) => {
          const onE1 = (session: string, n: number) =>
            !sims.some((sim) =>
              sim.received.some((body) => lastUserText(body) === `${session} turn ${n}`)
            );
          const sessions = Array.from({ length: 9 }, (_, i) => `k${i}`);
          const first = await Promise.all(sessions.map((session) => turn(client, session, 1)));
          for (const reply of first) equal(reply.json!.type, "done");
          const victims = sessions.filter((session) => onE1(session, 1));
          assert(victims.length > 0, "no session on engine e1");

          // Second turns: the first victim's streams, the others' do not. Engine e1 is killed
          // once the first victim's answer has begun to reach its client.
          assert(victims.length >= 2, `one session on engine e1: ${victims}`);
          const streaming = victims[0];
          const requests = sessions.map((session) => ({ session, stream: session === streaming }));
          const replies = requests.map(({ session, stream }) =>
            turn(client, session, 2, { stream })
          );
          await client.next(
            (m) => m.json?.type === "delta" && m.json.request_id === `${streaming}-2`,
            10_000,
          );
          await engine.kill();
          const finals = await Promise.all(replies);
          for (const [i, reply] of finals.entries()) {
            const { session } = requests[i];
            if (session === streaming) {
              // Its text had reached the client: an error with a retry hint, as with one engine.
              const error = reply.json!.error as { code: string; retry_after_ms?: number };
              equal(error?.code, "engine_unavailable", reply.text);
              equal(typeof error.retry_after_ms, "number", reply.text);
            } else {
              // Nothing of it had: answered, by another engine when e1 had it.
              equal(reply.json!.type, "done", reply.text);
              if (victims.includes(session)) assert(!onE1(session, 2), session);
            }
          }
          // The victims' next turns go elsewhere, and are answered.
          for (const session of victims) {
            const reply = await turn(client, session, 3);
            equal(reply.json!.type, "done", reply.text);
            assert(!onE1(session, 3), `${session} turn 3 went to the dead engine`);
          }
          let text = await metrics(port);
          equal(sample(text, "vllm_mqtt_engine_ready", 'engine="e1"'), 0);
          assert(
            sample(text, "vllm_mqtt_route_decisions_total", 'engine="e0",reason="rehomed"') +
                sample(text, "vllm_mqtt_route_decisions_total", 'engine="e2",reason="rehomed"') >=
              victims.length,
            text,
          );
          match(service.log(), /Engine e1 unavailable/);

          // Engine e1 comes back: the probe sees it, and it takes new sessions again (with an
          // empty cache it is the dearer choice for a small turn: a burst of long ones fills the
          // others).
          engine = await startEngineProcess(enginePort, env);
          await waitFor(
            async () => sample(await metrics(port), "vllm_mqtt_engine_ready", 'engine="e1"') === 1,
            15_000,
            "engine e1 back",
          );
          const fresh = Array.from({ length: 12 }, (_, i) => `back${i}`);
          const long = "tell me more about the maze ".repeat(80);
          const back = await Promise.all(
            fresh.map((session) =>
              turn(client, session, 1, { message: `${session} turn 1 ${long}` })
            ),
          );
          for (const reply of back) equal(reply.json!.type, "done", reply.text);
          const tookNew = sample(
            await metrics(port),
            "vllm_mqtt_route_decisions_total",
            'engine="e1",reason="new"',
          );
          assert(tookNew > 0, "engine e1 took no new session");
          text = await metrics(port);
          assert(sample(text, "vllm_mqtt_engine_outages_total", 'engine="e1"') >= 1);
        },
      );
    } finally {
      await engine.kill().catch(() => {});
    }
  });
});

/** Starts the service on two engines that do not serve `adapter`, which `project` asks for. */
async function startRefusedForAdapter(dir: string, project: string, adapter: string) {
  await withSimulators(2, {}, async (sims) => {
    const broker = await startMosquitto();
    const dataDir = await tempDir("vllm-mqtt-data-");
    try {
      const refused = await startService([
        "--engine=url",
        `--engine-url=${sims.map((sim) => sim.url).join(",")}`,
        `--mqtt-url=${broker.url}`,
        `--data-dir=${dataDir}`,
        `--prompts-dir=${dir}`,
        `--projects=${project}`,
      ], { expectExit: true });
      assert(await refused.stop() !== 0);
      match(
        refused.log(),
        new RegExp(`asks for ${adapter}, which none of the engines \\(.*\\) serves`),
      );
    } finally {
      await broker.close();
      await removeTempDir(dataDir);
    }
  });
}

test("several engines: a project's adapter goes only to the engines that serve it", async () => {
  const dir = await tempDir("vllm-mqtt-prompts-");
  await Deno.writeTextFile(`${dir}/tuned.md`, "---\nmodel: maze-lora\n---\n# Tuned\n");
  await Deno.writeTextFile(`${dir}/general.md`, "# General\n");
  try {
    // Engine 1 alone serves the adapter.
    await withSimulators(
      3,
      (i) => i === 1 ? { adapters: ["maze-lora"] } : {},
      async (sims) => {
        await withServiceOn(
          sims.map((sim) => sim.url).join(","),
          { args: [`--prompts-dir=${dir}`, "--projects=tuned,general"] },
          async ({ client }) => {
            await client.subscribe(["tuned/assistant_response/#"]);
            const tuned = Array.from({ length: 6 }, (_, i) => `t${i}`);
            const general = Array.from({ length: 9 }, (_, i) => `g${i}`);
            const replies = await Promise.all([
              ...tuned.map((s) => turn(client, s, 1, {}, "tuned")),
              ...general.map((s) => turn(client, s, 1, {}, "general")),
            ]);
            for (const reply of replies) equal(reply.json!.type, "done", reply.text);
            for (const session of tuned) deepEqual([...enginesOf(sims, session)], [1]);
            // The adapter's name reached only engine 1; the other projects use every engine.
            for (const [i, sim] of sims.entries()) {
              const adapters = sim.received.filter((body) => body.model === "maze-lora").length;
              equal(adapters, i === 1 ? tuned.length : 0);
            }
            const used = new Set(general.flatMap((session) => [...enginesOf(sims, session)]));
            assert(used.has(0) || used.has(2), "no general session went to engines 0 or 2");
          },
        );
      },
    );
    // No engine serving it: the start stops, saying so.
    await startRefusedForAdapter(dir, "tuned", "maze-lora");
  } finally {
    await removeTempDir(dir);
  }
});

test("several engines: an experiment's adapter variant goes only to the engines that serve it", async () => {
  const dir = await tempDir("vllm-mqtt-prompts-");
  await Deno.writeTextFile(
    `${dir}/maze.md`,
    [
      "---",
      "variants:",
      "  - name: a",
      "    weight: 50",
      "  - name: b",
      "    weight: 50",
      "    model: maze-lora-v2",
      "---",
      "# Maze",
    ].join("\n"),
  );
  await Deno.writeTextFile(`${dir}/general.md`, "# General\n");
  try {
    // Engine 2 alone serves b's adapter.
    await withSimulators(
      3,
      (i) => i === 2 ? { adapters: ["maze-lora-v2"] } : {},
      async (sims) => {
        await withServiceOn(
          sims.map((sim) => sim.url).join(","),
          { args: [`--prompts-dir=${dir}`] },
          async ({ client }) => {
            const sessions = Array.from({ length: 12 }, (_, i) => `x${i}`);
            const variantOf = new Map<string, string>();
            for (let n = 1; n <= 2; n++) {
              const replies = await Promise.all(sessions.map((s) => turn(client, s, n)));
              for (const [i, reply] of replies.entries()) {
                equal(reply.json!.type, "done", reply.text);
                const variant = String(reply.json!.variant);
                equal(variantOf.get(sessions[i]) ?? variant, variant, "one variant a session");
                variantOf.set(sessions[i], variant);
              }
            }
            const b = sessions.filter((s) => variantOf.get(s) === "b");
            assert(b.length > 0 && b.length < sessions.length, JSON.stringify([...variantOf]));
            for (const session of b) deepEqual([...enginesOf(sims, session)], [2], session);
            // The adapter's name reached engine 2 alone, once for each of b's turns.
            for (const [i, sim] of sims.entries()) {
              const adapter = sim.received.filter((body) => body.model === "maze-lora-v2").length;
              equal(adapter, i === 2 ? 2 * b.length : 0);
            }
          },
        );
      },
    );
    // No engine serving it: the start stops, naming the adapter.
    await startRefusedForAdapter(dir, "maze", "maze-lora-v2");
  } finally {
    await removeTempDir(dir);
  }
});

test("several engines: two instances in a share group keep each session on one engine", async () => {
  await withSimulators(3, {}, async (sims) => {
    const broker = await startMosquitto();
    const dataDir = await tempDir("vllm-mqtt-data-");
    const instances: ServiceProcess[] = [];
    const ports = [freePort(), freePort()];
    const client = await TestClient.connect(broker.url);
    try {
      for (const [i, name] of ["a", "b"].entries()) {
        instances.push(
          await startService([
            "--engine=url",
            `--engine-url=${sims.map((sim) => sim.url).join(",")}`,
            `--mqtt-url=${broker.url}`,
            `--data-dir=${dataDir}`,
            "--projects=maze",
            "--share-group=maze-bridge",
            `--mqtt-client-id=fleet-${name}`,
            `--http-port=${ports[i]}`,
            "--rate-limit=0",
          ]),
        );
      }
      await client.subscribe("maze/assistant_response/#");
      const sessions = Array.from({ length: 8 }, (_, i) => `sg${i}`);
      for (let n = 1; n <= 4; n++) {
        const replies = await Promise.all(sessions.map((s) => turn(client, s, n)));
        for (const reply of replies) equal(reply.json!.type, "done", reply.text);
      }
      for (const session of sessions) equal(enginesOf(sims, session).size, 1, session);
      // The instances' shared record of each session's home names the engine that ran it.
      const kv = await Deno.openKv(`${dataDir}/sessions.kv`);
      try {
        for (const session of sessions) {
          const home = (await kv.get<string>(["route", "maze", session])).value;
          equal(home, `e${[...enginesOf(sims, session)][0]}`, session);
        }
        // A session cleared or deleted (by whichever instance takes the command) is forgotten
        // there: the instance that runs its next turn places it anew.
        await control(client, "clear_history", "sg0");
        await control(client, "delete_session", "sg1");
        equal((await kv.get(["route", "maze", "sg0"])).value, null);
        equal((await kv.get(["route", "maze", "sg1"])).value, null);
        equal((await kv.get<string>(["route", "maze", "sg2"])).value?.startsWith("e"), true);
      } finally {
        kv.close();
      }
      // Both instances ran turns (the broker split them): the agreement was needed.
      for (const port of ports) {
        const text = await metrics(port);
        const turns = [0, 1, 2].reduce(
          (sum, i) => sum + sample(text, "vllm_mqtt_engine_turns_total", `engine="e${i}"`),
          0,
        );
        assert(turns > 0, `the instance on port ${port} ran no turn`);
      }
    } finally {
      await client.close();
      for (const instance of instances) await instance.stop();
      await broker.close();
      await removeTempDir(dataDir);
    }
  });
});

/** A folder holding an executable `vllm` that runs the stand-in. */
async function standInPath(): Promise<string> {
  const dir = await tempDir("vllm-stand-in-");
  await Deno.writeTextFile(
    `${dir}/vllm`,
    `#!/bin/sh\nexec "${Deno.execPath()}" run -A "${ROOT}tests/stand_in/vllm_stand_in.ts" "$@"\n`,
  );
  await Deno.chmod(`${dir}/vllm`, 0o755);
  return dir;
}

test("managed vLLM: --visible-devices with groups starts one vLLM per group, each on its GPUs with its tensor parallelism", async () => {
  const broker = await startMosquitto();
  const dir = await standInPath();
  const dataDir = await tempDir("vllm-mqtt-data-");
  const client = await TestClient.connect(broker.url);
  let service: ServiceProcess | undefined;
  try {
    service = await startService([
      "--engine=vllm",
      `--mqtt-url=${broker.url}`,
      `--data-dir=${dataDir}`,
      "--projects=maze",
      "--visible-devices=0,1;2,3",
    ], {
      env: { PATH: `${dir}:${Deno.env.get("PATH")}`, STAND_IN_RECORD: `${dir}/record-{port}.json` },
    });
    const records = await Promise.all(
      [...Deno.readDirSync(dir)].filter((e) => e.name.startsWith("record-")).map(async (e) =>
        JSON.parse(await Deno.readTextFile(`${dir}/${e.name}`))
      ),
    );
    const seen = records.map(({ args, env }) => {
      const value = (name: string) => args[args.indexOf(name) + 1];
      return [env.CUDA_VISIBLE_DEVICES, value("--tensor-parallel-size")];
    }).sort();
    deepEqual(seen, [["0,1", "2"], ["2,3", "2"]]);
    const ports = records.map(({ args }) => args[args.indexOf("--port") + 1]);
    equal(new Set(ports).size, 2, "both on one port");
    // Both answer: sessions go to either.
    await client.subscribe("maze/assistant_response/#");
    const replies = await Promise.all(
      Array.from({ length: 6 }, (_, i) => turn(client, `v${i}`, 1)),
    );
    for (const reply of replies) equal(reply.json!.type, "done", reply.text);
    match(service.log(), /Engine e0: http:\/\/127\.0\.0\.1:\d+\/v1/);
    match(service.log(), /Engine e1: http:\/\/127\.0\.0\.1:\d+\/v1/);
  } finally {
    await client.close();
    await service?.stop();
    await broker.close();
    await removeTempDir(dataDir);
    await removeTempDir(dir);
  }
});

test("managed vLLM: an engine that gives up for good stays out, and the others serve", async () => {
  const broker = await startMosquitto();
  const dir = await standInPath();
  const dataDir = await tempDir("vllm-mqtt-data-");
  const port = freePort();
  const client = await TestClient.connect(broker.url);
  let service: ServiceProcess | undefined;
  try {
    // The vLLM on GPU 1 dies 1.5 s after it is up; no restart is allowed.
    service = await startService([
      "--engine=vllm",
      `--mqtt-url=${broker.url}`,
      `--data-dir=${dataDir}`,
      "--projects=maze",
      "--visible-devices=0;1",
      "--vllm-max-restarts=0",
      `--http-port=${port}`,
    ], {
      env: {
        PATH: `${dir}:${Deno.env.get("PATH")}`,
        STAND_IN_EXIT_AFTER_MS: "1500",
        STAND_IN_EXIT_GPUS: "1",
      },
    });
    await waitFor(
      () => /Engine e1 gave up for good .*; it stays out, 1 other\(s\) serve/.test(service!.log()),
      15_000,
      "engine e1 to give up",
    );
    await client.subscribe("maze/assistant_response/#");
    const replies = await Promise.all(
      Array.from({ length: 6 }, (_, i) => turn(client, `gone${i}`, 1)),
    );
    for (const reply of replies) equal(reply.json!.type, "done", reply.text);
    const text = await metrics(port);
    equal(sample(text, "vllm_mqtt_engine_gave_up", 'engine="e1"'), 1);
    equal(sample(text, "vllm_mqtt_engine_turns_total", 'engine="e0"'), 6);
    assert(!service.exited(), "the program gave up with one engine left");
    const ready = await fetch(`http://127.0.0.1:${port}/readyz`);
    equal(ready.status, 200, await ready.text());
  } finally {
    await client.close();
    await service?.stop();
    await broker.close();
    await removeTempDir(dataDir);
    await removeTempDir(dir);
  }
});
