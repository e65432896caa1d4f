/**
 * Drop-in: the clients and command lines of the
 * deployment this service replaces, each with its exact payload or command,
 * against a real mosquitto and the service as a child process.
 */

import assert, { deepEqual, equal, match } from "node:assert/strict";
import { parseConfig } from "../lib/config/config.ts";
import { SERVICE_PERMISSIONS } from "../lib/config/permissions.ts";
import { vllmArgs, vllmEnv } from "../lib/engine/vllm_supervisor.ts";
import { parseRequest } from "../lib/protocol/request.ts";
import { startSimulator } from "../lib/engine/simulator.ts";
import {
  mosquittoTest as test,
  originalClient,
  removeTempDir,
  ROOT,
  spawnDeno,
  startMosquitto,
  startService,
  tempDir,
  TestClient,
  waitFor,
  withOriginalClient,
} from "./_helpers.ts";

const RATE_LIMITED = "Error: Rate limit exceeded. Please slow down your requests.";

/** The messages received on `topic`. */
const on = (client: TestClient, topic: string) => client.received.filter((m) => m.topic === topic);

test("1. the Flask relay's nulls mean 'not given', in both field styles", async () => {
  await withOriginalClient(
    { filter: "maze/assistant_response/relay1" },
    async (relay, { client, sim }) => {
      // The relay sends every option its user left empty as null.
      await relay.send("maze/user_input", {
        sessionId: "relay1",
        message: "hello",
        temperature: null,
        topP: null,
        maxTokens: null,
        systemPrompt: null,
        replyTopic: null,
        clientId: null,
      }, { qos: 0 });
      const reply = await relay.next(() => true);
      equal(reply.text, '[Maze guide] Turn 1: you said "hello".');
      const body = sim.received.at(-1)!;
      deepEqual([body.temperature, body.top_p, body.max_tokens], [0.6, 0.9, 512]);

      await client.send("maze/user_input", {
        session_id: "v1null",
        message: "hi",
        request_id: null,
        priority: null,
        stream: null,
        format: null,
        params: { max_tokens: null, temperature: null, top_p: null, stop: null },
      });
      equal((await client.final("v1null")).json!.type, "done");
    },
  );
});

test("2. maxTokens is passed on up to what fits the context, not cut to --max-tokens", async () => {
  await withOriginalClient({ filter: "maze/assistant_response/#" }, async (game, { sim }) => {
    // The QA pipeline's request.
    await game.send("maze/user_input", {
      sessionId: "qa",
      message: "Which entities are related to aspirin?",
      temperature: 0.1,
      maxTokens: 1536,
    });
    match((await game.next((m) => m.topic.endsWith("/qa"))).text, /^\[Maze guide\]/);
    equal(sim.received.at(-1)!.max_tokens, 1536);
    // The web page's slider at its top: more than the 4096-token context leaves.
    await game.send("maze/user_input", { sessionId: "web", message: "tell me", maxTokens: 4000 });
    const reply = await game.next((m) => m.topic.endsWith("/web"));
    match(reply.text, /^\[Maze guide\] Turn 1/);
    const asked = sim.received.at(-1)!.max_tokens as number;
    assert(asked > 3500 && asked < 4000, `max_tokens ${asked}`);
  });
});

Deno.test("2. an operator cap bounds max_tokens; without one, the context does", () => {
  const limits = {
    maxPayloadBytes: 65536,
    maxMessageChars: 16000,
    maxPriority: 10,
    maxTokens: 512,
    temperature: 0.6,
    topP: 0.9,
    stream: true,
    maxModelLen: 4096,
  };
  const ask = (extra: Record<string, unknown>, maxTokens: number) => {
    const payload = new TextEncoder().encode(
      JSON.stringify({ sessionId: "s", message: "x", maxTokens }),
    );
    const outcome = parseRequest(payload, "maze", "maze/assistant_response/", {
      ...limits,
      ...extra,
    });
    assert(outcome.ok);
    return outcome.request.params.max_tokens;
  };
  equal(ask({}, 4000), 4000);
  equal(ask({}, 100_000), 4095);
  equal(ask({ maxTokensCap: 1024 }, 4000), 1024);
  equal(ask({ maxTokensCap: 1024 }, 700), 700);
  const config = (argv: string[]) => {
    const parsed = parseConfig(argv, {});
    assert(!parsed.help);
    return parsed.config;
  };
  equal(config([]).maxTokensCap, 0);
  equal(config(["--max-tokens-cap", "2048"]).maxTokensCap, 2048);
});

test("3. projects without a prompt file start with the general prompt and a warning", async () => {
  const args = ["--projects=prompt_portal,completion_service,kg_llm_new"];
  await withOriginalClient(
    { args, filter: "+/assistant_response/#" },
    async (backend, { service }) => {
      const ask = async (project: string) => {
        await backend.send(`${project}/user_input`, { sessionId: "u1", message: "hi" });
        return (await backend.next((m) => m.topic === `${project}/assistant_response/u1`)).text;
      };
      match(await ask("prompt_portal"), /^\[Prompt workshop assistant\] Turn 1/);
      match(await ask("completion_service"), /^\[Text completion\] Turn 1/);
      match(await ask("kg_llm_new"), /^\[General assistant\] Turn 1/);
      match(
        service.log(),
        /Project kg_llm_new has no system prompt.*create prompts\/kg_llm_new\.md/,
      );
      assert(!/prompt_portal has no system prompt/.test(service.log()));
    },
  );
});

test("4. a backend relaying 130 users under one clientId gets 130 answers", async () => {
  await withOriginalClient({ filter: "maze/assistant_response/#" }, async (backend) => {
    await Promise.all(
      Array.from({ length: 130 }, (_, i) =>
        backend.send("maze/user_input", {
          sessionId: `user-${i}`,
          clientId: "prompt-portal-backend",
          message: "hint please",
        })),
    );
    await waitFor(() => backend.received.length >= 130, 30_000, "130 answers");
    const refused = backend.received.filter((m) => m.text.startsWith("Error:"));
    deepEqual(refused.map((m) => m.text), []);
  });
});

test("4. one session's burst of 25: the original's 20 go through, then its own refusal text", async () => {
  const topic = "maze/assistant_response/burst";
  await withOriginalClient({ filter: topic }, async (game) => {
    for (let i = 0; i < 25; i++) {
      await game.send("maze/user_input", { sessionId: "burst", message: `move ${i}` });
    }
    await waitFor(() => on(game, topic).length >= 25, 30_000, "25 replies");
    const texts = on(game, topic).map((m) => m.text);
    equal(texts.filter((t) => t === RATE_LIMITED).length, 5, texts.join("\n"));
    equal(texts.filter((t) => t.startsWith("[Maze guide]")).length, 20);
  });
});

test("5. session ids people type are answered; a missing one gets default-xxxxxxxx", async () => {
  await withOriginalClient({ filter: "maze/assistant_response/#" }, async (game) => {
    const reply = (topic: string) => game.next((m) => m.topic === topic);
    await game.send("maze/user_input", { sessionId: "ann@example.com", message: "hi" });
    match((await reply("maze/assistant_response/ann@example.com")).text, /Turn 1/);
    await game.send("maze/user_input", { sessionId: 12345, message: "hi" });
    match((await reply("maze/assistant_response/12345")).text, /Turn 1/);
    await game.send("maze/user_input", { sessionId: 12345, message: "again" });
    await game.next((m) => m.topic.endsWith("/12345") && /Turn 2/.test(m.text));
    // No id, but a reply topic: the session of that topic, answered there.
    await game.send("maze/user_input", {
      message: "hi",
      replyTopic: "maze/assistant_response/web-tab-1",
    });
    match((await reply("maze/assistant_response/web-tab-1")).text, /Turn 1/);
    // No id at all: a conversation of its own, as the original made it (camelCase fields
    // mark the original's form, answered in plain text).
    await game.send("maze/user_input", { message: "anyone?", maxTokens: 256 });
    const fresh = await game.next((m) => /\/default-[0-9a-f]{8}$/.test(m.topic));
    match(fresh.text, /Turn 1: you said "anyone\?"/);
    // An id that cannot be a topic level has no topic its client may read: not answered,
    // not even on a reply topic it names (which could be anyone's); nothing elsewhere.
    await game.send("maze/user_input", {
      sessionId: "a/b",
      message: "hi",
      replyTopic: "maze/assistant_response/safe",
    });
    await game.send("maze/user_input", { sessionId: "tab\there", message: "hi" });
    // Ids that look like another (inner white space, an invisible character) are refused too.
    await game.send("maze/user_input", { sessionId: "my session", message: "hi" });
    await game.send("maze/user_input", { sessionId: "ok\u200b", message: "hi" });
    await game.send("maze/user_input", { sessionId: "x".repeat(129), message: "hi" });
    await game.send("maze/user_input", { sessionId: "ok", message: "still there?" });
    await reply("maze/assistant_response/ok");
    const topics = game.received.map((m) => m.topic);
    assert(
      !topics.some((t) => /\/a\/b|\/a$|\/safe$|\t|x{129}| |\u200b/.test(t)),
      topics.join("\n"),
    );
  });
});

test("6. control topics as the original's clients use them", async () => {
  await withOriginalClient({ filter: "maze/assistant_response/#" }, async (game) => {
    const ask = async (sessionId: string, message: string) => {
      const before = game.received.length;
      await game.send("maze/user_input", { sessionId, message });
      return (await game.next((m) =>
        game.received.indexOf(m) >= before && m.topic === `maze/assistant_response/${sessionId}`
      )).text;
    };
    const control = async (topic: string, payload: unknown) => {
      const before = game.received.length;
      await game.send(topic, payload);
      return (await game.next((m) => game.received.indexOf(m) >= before)).text;
    };
    await ask("c1", "one");
    // The prompt portal's form: the template as an object, reset left to its default (true).
    match(
      await control("maze/template/c1", { template: { content: "You are Cap." } }),
      /System prompt set for session c1; history cleared/,
    );
    match(await ask("c1", "hi"), /^\[You are Cap\.\] Turn 1/);
    match(
      await control("maze/template", { sessionId: "c1", system_prompt: "You are Bo." }),
      /set for session c1/,
    );
    match(await ask("c1", "hi"), /^\[You are Bo\.\] Turn 1/);
    match(
      await control("maze/template/c1", {
        prompt_template: { content: "You are Al." },
        reset: false,
      }),
      /set for session c1\.$/,
    );
    match(await ask("c1", "hi"), /^\[You are Al\.\] Turn 2/);
    // `target` on the base topic: that session only.
    await ask("c2", "one");
    await ask("c3", "one");
    match(await control("maze/clear_history", { target: "c2" }), /cleared for session c2/);
    match(await ask("c2", "two"), /Turn 1/);
    match(await ask("c3", "two"), /Turn 2/);
    // A number names a session too; it does not mean every session.
    await ask("777", "one");
    match(await control("maze/delete_session", { sessionId: 777 }), /Deleted session 777/);
    match(await ask("777", "two"), /Turn 1/);
    match(await ask("c3", "three"), /Turn 3/);
  });
});

test("7. the originals' command lines: server_url, timeouts, debug, sessions kept", async () => {
  const broker = await startMosquitto();
  const sim = await startSimulator({ ttftMs: 5, itlMs: 1 });
  const dataDir = await tempDir("vllm-mqtt-data-");
  // llamacpp_mqtt_deploy.py's command line, with vLLMDeploy.py's model options.
  const service = await startService([
    "--projects",
    "maze general",
    "--server_url",
    sim.url,
    "--server_timeout",
    "300",
    "--mqtt_broker",
    "127.0.0.1",
    "--mqtt_port",
    String(broker.port),
    "--max_concurrent_sessions",
    "2",
    "--num_workers",
    "2",
    "--enable_debug_logging",
    "--model_cache_dir",
    "./models/modelscope",
    "--model_revision",
    "master",
    "--auto_download",
    "False",
    "--model_provider",
    "modelscope",
    `--data-dir=${dataDir}`,
    `--mqtt-client-id=svc-${crypto.randomUUID()}`,
  ]);
  const game = await originalClient(broker.url, "maze/assistant_response/#");
  try {
    const ask = async (sessionId: string) => {
      const before = game.received.length;
      await game.send("maze/user_input", { sessionId, message: "hi" });
      return (await game.next((m) =>
        game.received.indexOf(m) >= before && m.topic.endsWith(`/${sessionId}`)
      )).text;
    };
    match(await ask("s1"), /Turn 1/);
    match(await ask("s1"), /Turn 2/);
    await ask("s2");
    await ask("s3");
    // Two sessions kept: s1, the least recently used, was evicted.
    await waitFor(async () => /Turn 1/.test(await ask("s1")), 10_000, "s1 evicted");
    match(service.log(), /\[DBG\]/);
  } finally {
    await game.close();
    await service.stop();
    await sim.close();
    await broker.close();
    await removeTempDir(dataDir);
  }
});

Deno.test("7. the originals' options mean what they meant", () => {
  const parsed = parseConfig([
    "--server_url",
    "http://localhost:8080",
    "--server_timeout",
    "300",
    "--enable_debug_logging",
    "--max_concurrent_sessions",
    "100",
    "--model_cache_dir",
    "./models",
    "--model_revision",
    "v1.0",
    "--auto_download",
    "False",
    "--model_provider",
    "modelscope",
  ], {});
  assert(!parsed.help);
  const config = parsed.config;
  deepEqual([config.engine, config.engineUrl], ["url", "http://localhost:8080"]);
  equal(config.requestTimeoutMs, 300_000);
  equal(config.logLevel, "debug");
  equal(config.maxSessions, 100);
  equal(config.maxInFlight, 256);
  const args = vllmArgs(config, 8000);
  match(args.join(" "), /--download-dir \.\/models --revision v1\.0/);
  const env = vllmEnv(config, {}, "key");
  deepEqual([env.HF_HUB_OFFLINE, env.VLLM_USE_MODELSCOPE], ["1", "True"]);
});

/** `deno task start`'s command, from deno.json, with the real deno binary. */
function taskCommand(): string[] {
  const tasks = JSON.parse(Deno.readTextFileSync(`${ROOT}deno.json`)).tasks;
  const [deno, ...rest] = (tasks.start as string).split(" ");
  equal(deno, "deno");
  return rest;
}

/** Runs `deno` with `args` in the checkout; resolves when it exits or logs "Serving". */
async function run(args: string[], stop = false) {
  const deno = spawnDeno(args);
  await waitFor(() => deno.exited() || deno.log().includes("Serving "), 30_000, "start-up");
  // Not to be stopped: it is expected to exit by itself.
  if (!stop) await deno.child.status;
  return { code: await deno.stop(), output: deno.log() };
}

test("8, 9. a data and prompts folder elsewhere: the exact command that works, no noise", async () => {
  const broker = await startMosquitto();
  const sim = await startSimulator({ ttftMs: 5, itlMs: 1 });
  const dataDir = await tempDir("vllm-mqtt-data-");
  const promptsDir = await tempDir("vllm-mqtt-prompts-");
  await Deno.copyFile(`${ROOT}prompts/maze.md`, `${promptsDir}/maze.md`);
  const args = [
    "--engine",
    "url",
    "--engine-url",
    sim.url,
    "--mqtt-url",
    broker.url,
    "--projects",
    "maze",
    "--http-port",
    "0",
    "--data-dir",
    dataDir,
    "--prompts-dir",
    promptsDir,
    "--mqtt-client-id",
    `svc-${crypto.randomUUID()}`,
  ];
  try {
    const refused = await run([...taskCommand(), ...args]);
    equal(refused.code, 2, refused.output);
    assert(!/create .*maze\.md|--allow-write flag/.test(refused.output), refused.output);
    const command = /\n {2}(deno run .*)\n?$/.exec(refused.output)?.[1];
    assert(command, refused.output);
    match(command, new RegExp(`--allow-write=[^ ]*${dataDir}`));
    match(command, new RegExp(`--allow-read=[^ ]*${promptsDir}`));
    // The command as printed, run by a shell, serves a client.
    const words = (await new Deno.Command("bash", {
      args: ["-c", `printf '%s\\0' ${command.slice("deno ".length)}`],
    }).output()).stdout;
    const commandArgs = new TextDecoder().decode(words).split("\0").slice(0, -1);
    const served = spawnDeno(commandArgs);
    try {
      await waitFor(
        () => served.log().includes("Serving "),
        30_000,
        () => `serving:\n${served.log()}`,
      );
      const game = await originalClient(broker.url, "maze/assistant_response/p1");
      await game.send("maze/user_input", { sessionId: "p1", message: "hi" });
      match((await game.next(() => true)).text, /^\[Maze guide\] Turn 1/);
      await game.close();
    } finally {
      await served.stop("SIGTERM");
    }
    assert(!/Failed to resolve|Warning|Info/.test(served.log()), served.log());
  } finally {
    await sim.close();
    await broker.close();
    for (const dir of [dataDir, promptsDir]) await removeTempDir(dir);
  }
});

test("8, 9. `deno task start` with the production data folder, without noise", async () => {
  const dir = "/var/lib/vllm-mqtt";
  const exists = await Deno.stat(dir).then(() => true, () => false);
  // Never touch a real deployment's data; a machine where it cannot be made is skipped.
  if (exists || !(await Deno.mkdir(dir).then(() => true, () => false))) {
    console.warn(`${dir} exists or cannot be made: skipped`);
    return;
  }
  const broker = await startMosquitto();
  try {
    const { output } = await run([
      ...taskCommand(),
      "--engine",
      "sim",
      "--mqtt-url",
      broker.url,
      "--http-port",
      "0",
      "--data-dir",
      dir,
      "--mqtt-client-id",
      `svc-${crypto.randomUUID()}`,
    ], true);
    match(output, /Serving/);
    assert(!/Failed to resolve|Requires|Warning/.test(output), output);
    assert((await Deno.stat(`${dir}/sessions.kv`)).isFile);
  } finally {
    await broker.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("8. the permission set the program names is deno.json's", () => {
  const set = JSON.parse(Deno.readTextFileSync(`${ROOT}deno.json`)).permissions.service;
  deepEqual(set.net, SERVICE_PERMISSIONS.net);
  deepEqual(set.read, SERVICE_PERMISSIONS.read);
  deepEqual(set.write, SERVICE_PERMISSIONS.write);
});
