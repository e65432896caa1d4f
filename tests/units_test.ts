/**
 * Unit tests of the pure parts: configuration, request parsing, trimming,
 * the thinking filter and the scheduler's ordering.
 */

import assert, { deepEqual, equal, match, throws } from "node:assert/strict";
import { ConfigError, helpText, parseConfig } from "../lib/config/config.ts";
import { OPTIONS } from "../lib/config/options.ts";
import { MACHINE_DEFAULTS, OPTIONS_DOC_PATH, optionsDoc } from "../tools/options_doc.ts";
import { PrefixCache } from "../lib/engine/prefix_cache.ts";
import { startSimulator } from "../lib/engine/simulator.ts";
import { engineTokenCount } from "../lib/engine/engine_tokenizer.ts";
import { messageTokenBound } from "../lib/tokens.ts";
import { stripThinking, ThinkingFilter } from "../lib/engine/thinking_filter.ts";
import { parseRequest, type RequestLimits, ServiceError } from "../lib/protocol/mod.ts";
import { Scheduler } from "../lib/scheduler/scheduler.ts";
import { SessionStore } from "../lib/sessions/session_store.ts";
import { WriteGenerations } from "../lib/sessions/write_generations.ts";
import { historyBudget, messagesToDrop } from "../lib/sessions/trim.ts";
import { removeTempDir, tempDir } from "./_helpers.ts";

const config = (argv: string[], env: Record<string, string> = {}) => {
  const result = parseConfig(argv, env, () => "file-secret\n");
  if (result.help) throw new Error("unexpected help");
  return result.config;
};

Deno.test("config: defaults, flags, environment fallbacks, frozen", () => {
  const c = config([]);
  deepEqual(c.projects, ["general"]);
  equal(c.engine, "vllm");
  equal(c.maxModelLen, 4096);
  equal(c.temperature, 0.6);
  equal(c.maxInFlight, 256);
  assert(Object.isFrozen(c));
  const d = config(["--projects", "maze,driving", "--max-tokens=100"], {
    VLLM_MQTT_TEMPERATURE: "0",
  });
  deepEqual(d.projects, ["maze", "driving"]);
  equal(d.maxTokens, 100);
  equal(d.temperature, 0);
});

Deno.test("config: the original script's command line means the same as the new one", () => {
  const old = config([
    "--projects",
    "maze",
    "driving",
    "--model",
    "Qwen/Qwen3-8B",
    "--max_model_len",
    "8192",
    "--tensor_parallel_size",
    "2",
    "--gpu_memory_utilization",
    "0.8",
    "--max_history_tokens",
    "2000",
    "--num_workers",
    "3",
    "--skip_thinking",
    "False",
    "--mqtt_broker",
    "broker.local",
    "--mqtt_port",
    "1884",
    "--max_concurrent_sessions",
    "64",
    "--visible_devices",
    "2",
    "--model_provider",
    "modelscope",
    "--top_p",
    "0.8",
  ]);
  const now = config([
    "--projects=maze,driving",
    "--model=Qwen/Qwen3-8B",
    "--max-model-len=8192",
    "--tensor-parallel-size=2",
    "--gpu-memory-utilization=0.8",
    "--max-history-tokens=2000",
    "--workers=3",
    "--no-skip-thinking",
    "--mqtt-url=mqtt://broker.local:1884",
    "--max-sessions=64",
    "--visible-devices=2",
    "--model-provider=modelscope",
    "--top-p=0.8",
  ]);
  deepEqual({ ...old, warnings: [] }, { ...now, warnings: [] });
});

Deno.test("config: bad values stop start-up naming the option", () => {
  throws(
    () => config(["--max-tokens", "0"]),
    /'--max-tokens' must be at least 1: current value is "0"/,
  );
  throws(() => config(["--engine", "gpu"]), /'--engine' must be one of vllm, url, sim/);
  throws(() => config(["--engine", "url"]), /needs '--engine-url'/);
  throws(() => config(["--bogus"]), /unknown option '--bogus'/);
  throws(() => config(["--projects", "a/b"]), ConfigError);
  throws(() => config(["--mqtt-url", "http://x"]), /'--mqtt-url' must be/);
  throws(() => config(["--kv-url", "kv.example:4512"]), /'--kv-url' must be an http\(s\) URL/);
  throws(() => config(["--max-tokens", "5000"]), /below '--max-model-len'/);
});

Deno.test("config: secrets come from the environment or a file; on the command line they warn", () => {
  equal(config([], { VLLM_MQTT_MQTT_PASSWORD: "env-secret" }).mqttPassword, "env-secret");
  equal(config(["--mqtt-password-file", "/x"]).mqttPassword, "file-secret");
  const c = config(["--mqtt_password", "cli-secret"]);
  equal(c.mqttPassword, "cli-secret");
  match(c.warnings[0], /visible to other users/);
  assert(!c.warnings[0].includes("cli-secret"));
  // A password inside the broker's URL is as visible there.
  const inUrl = config(["--mqtt-url", "mqtt://svc:url-secret@127.0.0.1:1883"]);
  match(inUrl.warnings[0], /'--mqtt-url' on the command line holds a password/);
  assert(!inUrl.warnings[0].includes("url-secret"));
  deepEqual(config(["--mqtt-url", "mqtt://svc@127.0.0.1:1883"]).warnings, []);
});

Deno.test("config: --help lists every option with its default", () => {
  const help = helpText();
  for (const option of OPTIONS) assert(help.includes(`--${option.name}`), option.name);
  match(help, /--max-model-len <int>\n.*\[default: 4096\]/);
});

const LIMITS: RequestLimits = {
  maxPayloadBytes: 1024,
  maxMessageChars: 100,
  maxPriority: 10,
  maxTokens: 512,
  temperature: 0.6,
  topP: 0.9,
  stream: true,
};
const ROOT = "maze/assistant_response/";
const parse = (value: unknown) =>
  parseRequest(
    new TextEncoder().encode(typeof value === "string" ? value : JSON.stringify(value)),
    "maze",
    ROOT,
    LIMITS,
  );

Deno.test("request: v1 fields, clamping and defaults", () => {
  const outcome = parse({
    session_id: "s-1.a_b",
    message: "hi",
    priority: 99,
    params: { max_tokens: 9999, temperature: 0, top_k: 5, stop: "END" },
  });
  assert(outcome.ok);
  const r = outcome.request;
  equal(r.priority, 10);
  deepEqual(r.params, { max_tokens: 512, temperature: 0, top_p: 0.9, top_k: 5, stop: ["END"] });
  equal(r.style, "json");
  equal(r.stream, true);
});

Deno.test("request: the original camelCase form gets plain-text replies", () => {
  const outcome = parse({
    sessionId: "p",
    message: "hi",
    temperature: 0,
    topP: 0.5,
    maxTokens: 64,
    systemPrompt: "You are terse.",
    replyTopic: "maze/assistant_response/custom",
    requestId: "r",
    clientId: "game-1",
  });
  assert(outcome.ok);
  const r = outcome.request;
  deepEqual([r.sessionId, r.style, r.stream, r.requestId, r.clientId], [
    "p",
    "text",
    false,
    "r",
    "game-1",
  ]);
  deepEqual(r.params, { max_tokens: 64, temperature: 0, top_p: 0.5 });
  equal(r.systemPrompt, "You are terse.");
  equal(r.replyTopic, "maze/assistant_response/custom");
  const json = parse({ sessionId: "p", message: "hi", format: "json" });
  assert(json.ok && json.request.style === "json");
  // The reply topic is kept as named (the gateway decides whether its sender may read it);
  // a request that names no session is the session of the reply topic it names.
  const own = parse({ message: "hi", replyTopic: "maze/assistant_response/tab-1/client/r1" });
  assert(own.ok);
  deepEqual([own.request.sessionId, own.request.replyTopic], [
    "tab-1",
    "maze/assistant_response/tab-1/client/r1",
  ]);
  const elsewhere = parse({ message: "hi", replyTopic: "other/topic" });
  assert(elsewhere.ok);
  match(elsewhere.request.sessionId, /^default-[0-9a-f]{8}$/);
});

Deno.test("request: each bad input has its code, and an address when it names a session", () => {
  const bad = (value: unknown) => {
    const outcome = parse(value);
    assert(!outcome.ok);
    return [outcome.error.code, outcome.address?.sessionId];
  };
  deepEqual(bad("{oops"), ["invalid_request", undefined]);
  deepEqual(bad("[1]"), ["invalid_request", undefined]);
  deepEqual(bad({ session_id: "a/b", message: "x" }), ["invalid_request", undefined]);
  deepEqual(bad({ session_id: "a+", message: "x" }), ["invalid_request", undefined]);
  deepEqual(bad({ session_id: "a\u0000", message: "x" }), ["invalid_request", undefined]);
  deepEqual(bad({ session_id: "s" }), ["invalid_request", "s"]);
  deepEqual(bad({ session_id: "s", message: "x".repeat(101) }), ["invalid_request", "s"]);
  deepEqual(bad({ session_id: "s", message: "x", params: { logit_bias: {} } }), [
    "invalid_request",
    "s",
  ]);
  // Too large to parse whole, yet its session can be read and answered.
  deepEqual(bad({ session_id: "s", message: "x".repeat(2000) }), ["payload_too_large", "s"]);
  deepEqual(bad({ message: "x".repeat(2000), sessionId: "t" }), ["payload_too_large", "t"]);
  deepEqual(bad({ message: "x".repeat(2000) }), ["payload_too_large", undefined]);
  const invalidUtf8 = parseRequest(new Uint8Array([0x22, 0xff, 0x22]), "maze", ROOT, LIMITS);
  assert(!invalidUtf8.ok && /UTF-8/.test(invalidUtf8.error.message));
});

Deno.test("trim: nothing while under budget, whole turns down to the low-water mark beyond it", () => {
  const turn = (
    u: number,
    a: number,
  ) => [{ role: "user" as const, tokens: u }, { role: "assistant" as const, tokens: a }];
  const history = [...turn(50, 50), ...turn(50, 50), ...turn(50, 50), ...turn(50, 50)];
  equal(messagesToDrop(history, 100, 500), 0);
  // 400 + 150 > 500: drop turns until history and message fit 300 (60%): three turns.
  equal(messagesToDrop(history, 150, 500), 6);
  // Never splits a turn: a user message with two answers goes as one.
  const odd = [{ role: "user" as const, tokens: 10 }, { role: "assistant" as const, tokens: 10 }, {
    role: "assistant" as const,
    tokens: 10,
  }, ...turn(10, 10)];
  equal(messagesToDrop(odd, 100, 100), 5);
  equal(
    historyBudget({ maxHistoryTokens: 3000, maxModelLen: 4096, maxTokens: 512, systemTokens: 200 }),
    3000,
  );
  equal(
    historyBudget({ maxHistoryTokens: 3000, maxModelLen: 2048, maxTokens: 512, systemTokens: 200 }),
    2048 - 512 - 200 - 41,
  );
});

Deno.test("thinking: reasoning is removed however the stream splits it", () => {
  const text = "<think>\nsecret plan\n</think>\n\nThe answer is 42.";
  for (let size = 1; size <= text.length; size++) {
    const filter = new ThinkingFilter();
    let out = "";
    for (let i = 0; i < text.length; i += size) out += filter.push(text.slice(i, i + size));
    out += filter.end();
    equal(out, "The answer is 42.", `chunk size ${size}`);
  }
  equal(stripThinking("Before <think>x</think>after"), "Before after");
  equal(stripThinking("Answer <think>never closed"), "Answer ");
  equal(stripThinking("a < b and <thin ice"), "a < b and <thin ice");
});

Deno.test("thinking: a QwQ answer (no opening tag) loses its reasoning however the stream splits it", () => {
  const text = "secret plan\n</think>\n\nThe answer is 42.";
  for (let size = 1; size <= text.length; size++) {
    const filter = new ThinkingFilter({ opened: true });
    let out = "";
    for (let i = 0; i < text.length; i += size) out += filter.push(text.slice(i, i + size));
    out += filter.end();
    equal(out, "The answer is 42.", `chunk size ${size}`);
  }
  // The engine split the reasoning off (or the model did not think): all of it is the answer.
  equal(stripThinking("The answer is 42.", { opened: true }), "The answer is 42.");
  equal(stripThinking("<think>plan</think>Answer", { opened: true }), "Answer");
  // Without `opened`, such an answer keeps its reasoning: the filter cannot know.
  equal(stripThinking("plan</think>Answer"), "plan</think>Answer");
});

Deno.test("scheduler: priority then arrival; one per session; cap; queue_full; cancel", async () => {
  const started: string[] = [];
  const finishers = new Map<string, () => void>();
  const scheduler = new Scheduler<{ sessionKey: string; priority: number; name: string }>({
    maxQueue: 4,
    maxInFlight: 1,
    run: (item) =>
      new Promise<void>((resolve) => {
        started.push(item.name);
        finishers.set(item.name, resolve);
      }),
  });
  const tick = () => new Promise((resolve) => setTimeout(resolve, 0));
  scheduler.submit({ sessionKey: "a", priority: 0, name: "a1" });
  scheduler.submit({ sessionKey: "a", priority: -5, name: "a2" });
  scheduler.submit({ sessionKey: "b", priority: 5, name: "b1" });
  scheduler.submit({ sessionKey: "c", priority: -1, name: "c1" });
  scheduler.submit({ sessionKey: "d", priority: 0, name: "d1" });
  throws(
    () => scheduler.submit({ sessionKey: "e", priority: 0, name: "e1" }),
    (e: ServiceError) => e.code === "queue_full",
  );
  const removed = scheduler.cancel("d", new ServiceError("cancelled", "x"));
  deepEqual(removed.map((i) => i.name), ["d1"]);
  // a2 (priority -5) becomes ready when a1 finishes and beats c1 (-1).
  for (const name of ["a1", "a2", "c1", "b1"]) {
    await tick();
    equal(started.at(-1), name);
    finishers.get(name)!();
  }
  await scheduler.idle();
  deepEqual(started, ["a1", "a2", "c1", "b1"]);
});

Deno.test("compile: every module started as a worker is named in the compile task", async () => {
  const task: string =
    JSON.parse(await Deno.readTextFile(new URL("../deno.json", import.meta.url))).tasks
      .compile;
  const included = [...task.matchAll(/--include (\S+)/g)].map((m) => m[1]);
  const workers: string[] = [];
  for await (const entry of Deno.readDir(new URL("../lib", import.meta.url))) {
    if (!entry.isDirectory) continue;
    for await (const file of Deno.readDir(new URL(`../lib/${entry.name}`, import.meta.url))) {
      if (!file.isFile) continue;
      const source = await Deno.readTextFile(
        new URL(`../lib/${entry.name}/${file.name}`, import.meta.url),
      );
      for (const m of source.matchAll(/new URL\("\.\/(\w+\.ts)", import\.meta\.url\)/g)) {
        workers.push(`lib/${entry.name}/${m[1]}`);
      }
    }
  }
  deepEqual(workers.sort(), ["lib/engine/simulator_worker.ts", "lib/workers/request_worker.ts"]);
  for (const worker of workers) assert(included.includes(worker), `${worker} is not included`);
  assert(included.includes("prompts"), "prompts/ is not included");
  // The live page's files are imported as text (in the module graph, so in the executable
  // without an include, and read with no permission): every file of its folder.
  const dashboard = await Deno.readTextFile(
    new URL("../lib/observability/dashboard.ts", import.meta.url),
  );
  const imported = [...dashboard.matchAll(/from "\.\/page\/([\w.]+)" with \{ type: "text" \}/g)]
    .map((m) => m[1]);
  const files: string[] = [];
  for await (const file of Deno.readDir(new URL("../lib/observability/page", import.meta.url))) {
    files.push(file.name);
  }
  deepEqual(imported.sort(), files.sort());
});

Deno.test("deploy: every production path runs the real deno binary, never the npm shim", async () => {
  const read = (path: string) => Deno.readTextFile(new URL(`../${path}`, import.meta.url));
  // The npm `deno` may be a Node script that does not pass SIGTERM on: a stop would leave the
  // service running. The production paths run `deno-bin`, the real binary linked at install.
  const unit = await read("deploy/vllm-mqtt.service");
  match(unit, /^ExecStart=\/usr\/local\/bin\/deno-bin run /m);
  const engines = await read("docs/engines.md");
  assert(
    engines.includes(
      `ln -sf "$(deno eval 'console.log(Deno.execPath())')" /usr/local/bin/deno-bin`,
    ),
    "docs/engines.md's bare-metal steps do not link /usr/local/bin/deno-bin",
  );
  const dockerfile = await read("vllm.Dockerfile");
  match(
    dockerfile,
    /ln -sf "\$\(deno eval 'console.log\(Deno.execPath\(\)\)'\)" \/usr\/local\/bin\/deno-bin/,
  );
  match(dockerfile, /^ENTRYPOINT \["deno-bin", "run"/m);
});

Deno.test("deploy: the unit finds a vLLM in its virtualenv; the docs say what the image's health check asks", async () => {
  const read = (path: string) => Deno.readTextFile(new URL(`../${path}`, import.meta.url));
  // systemd's default PATH holds no virtualenv: `vllm` (run by name) would not be found.
  const unit = await read("deploy/vllm-mqtt.service");
  const path = /^Environment=PATH=(\S+)$/m.exec(unit)?.[1];
  assert(path, "the unit sets no PATH");
  const engines = await read("docs/engines.md");
  const venv = path.split(":")[0];
  assert(engines.includes(venv), `docs/engines.md does not name the unit's ${venv}`);
  // The image's HEALTHCHECK asks /readyz; the docs say the same.
  match(await read("vllm.Dockerfile"), /^HEALTHCHECK[^]*\/readyz/m);
  match(engines, /HEALTHCHECK\s+asks the program's `\/readyz`/);
});

Deno.test("docs/options.md: is what `deno task docs` renders from the option table now", async () => {
  const page = await Deno.readTextFile(new URL(`../${OPTIONS_DOC_PATH}`, import.meta.url));
  const rendered = optionsDoc();
  // Every option has its row, with its default (or, for a default computed on the machine, the
  // words for it), in what the generator renders...
  for (const option of OPTIONS) {
    const row = rendered.split("\n").find((line) => line.startsWith(`| \`--${option.name}\``));
    assert(row, `the generator leaves out --${option.name}`);
    if (MACHINE_DEFAULTS[option.name]) {
      assert(row.includes(MACHINE_DEFAULTS[option.name].text), `--${option.name}'s default`);
    } else if (option.default !== undefined) {
      const value = Array.isArray(option.default) ? option.default.join(",") : option.default;
      if (value !== "") assert(row.includes(`\`${value}\``), `--${option.name}'s default`);
    }
  }
  // ...and the page in the repository is exactly that: an option added or changed in
  // lib/config/options.ts without `deno task docs` fails here.
  equal(page, rendered, `${OPTIONS_DOC_PATH} is out of date: run \`deno task docs\``);
});

Deno.test("docs/options.md: --workers defaults to the number of CPU cores (at most 64), whatever that number is", async () => {
  // What the page claims...
  const row = optionsDoc().split("\n").find((line) => line.startsWith("| `--workers`"));
  match(String(row), /^\| `--workers` +\| the number of CPU cores, at most 64 +\|/);
  // ...checked on machines of other sizes than this one: the option table is read again as a
  // machine with that many cores reads it (a fresh copy of its module, the count stubbed).
  for (const [cores, workers] of [[1, 1], [3, 3], [64, 64], [128, 64]]) {
    Object.defineProperty(navigator, "hardwareConcurrency", { value: cores, configurable: true });
    try {
      const url = new URL(`../lib/config/options.ts?cores=${cores}`, import.meta.url).href;
      const table = (await import(url)) as typeof import("../lib/config/options.ts");
      equal(table.OPTIONS.find((option) => option.name === "workers")?.default, workers);
      equal(MACHINE_DEFAULTS.workers.value(), workers, "the generator's check of it");
    } finally {
      delete (navigator as { hardwareConcurrency?: number }).hardwareConcurrency;
    }
  }
  equal(navigator.hardwareConcurrency, config([]).workers, "the stub is gone");
});

Deno.test("prefix cache: whole blocks of an unchanged prefix hit; a change early misses the rest", () => {
  const cache = new PrefixCache(1000);
  const turn1 = Array.from({ length: 40 }, (_, i) => i); // 2 full blocks
  equal(cache.lookup(turn1), 0);
  const turn2 = [...turn1, ...Array.from({ length: 30 }, (_, i) => 100 + i)]; // 4 full blocks
  equal(cache.lookup(turn2), 32);
  // Dropping the first turn changes every block after it.
  equal(cache.lookup(turn2.slice(5)), 0);
  deepEqual([cache.queries, cache.hits], [40 + 70 + 65, 32]);
  // Least recently used blocks go beyond capacity.
  const small = new PrefixCache(2);
  small.lookup(turn2);
  equal(small.lookup(turn1), 0);
});

Deno.test("session store: two writers on one base both keep their turn, one after the other", async () => {
  const dir = await tempDir("vllm-mqtt-kv-");
  const [a, b] = await Promise.all([
    SessionStore.open(`${dir}/s.kv`, 60_000),
    SessionStore.open(`${dir}/s.kv`, 60_000),
  ]);
  try {
    const turn = (text: string) => [
      { role: "user" as const, content: text, tokens: 5 },
      { role: "assistant" as const, content: `re: ${text}`, tokens: 5 },
    ];
    // Both instances load the same (empty) session, then both commit.
    const [seenByA, seenByB] = await Promise.all([a.load("p", "s"), b.load("p", "s")]);
    await a.commitTurn("p", "s", seenByA, 0, turn("from a"));
    await b.commitTurn("p", "s", seenByB, 0, turn("from b"));
    const { history, meta } = await a.load("p", "s");
    deepEqual(history.map((m) => [m.seq, m.content]), [
      [0, "from a"],
      [1, "re: from a"],
      [2, "from b"],
      [3, "re: from b"],
    ]);
    deepEqual([meta!.firstSeq, meta!.nextSeq], [0, 4]);
  } finally {
    a.close();
    b.close();
    await removeTempDir(dir);
  }
});

Deno.test("session store: kept messages outlive the meta record, rewritten about once a TTL", async () => {
  const dir = await tempDir("vllm-mqtt-kv-");
  const ttl = 60_000;
  const store = await SessionStore.open(`${dir}/s.kv`, ttl);
  try {
    const t0 = Date.now();
    const lifetimes: number[] = [];
    for (let turn = 0; turn < 12; turn++) {
      const now = t0 + turn * (ttl / 4);
      const session = await store.load("p", "s", now);
      await store.commitTurn("p", "s", session, 0, [
        { role: "user", content: `turn ${turn}`, tokens: 5 },
        { role: "assistant", content: "ok", tokens: 5 },
      ], now);
      const { meta, history } = await store.load("p", "s", now);
      equal(history.length, 2 * (turn + 1));
      // Every kept message lives at least as long as the record that names it.
      assert(meta!.messagesExpireAt! >= meta!.expiresAt, `turn ${turn}`);
      lifetimes.push(meta!.messagesExpireAt!);
    }
    // 12 turns over 2.75 TTLs: the history was written 3 times, not 12.
    equal(new Set(lifetimes).size, 3, String(lifetimes.map((t) => t - t0)));
  } finally {
    store.close();
    await removeTempDir(dir);
  }
});

Deno.test("session store: threads sharing write counters see each other's turns without re-reading", async () => {
  const dir = await tempDir("vllm-mqtt-kv-");
  const generations = WriteGenerations.create();
  // Two workers of one process: each store gets the counters from the shared buffer.
  const [a, b] = await Promise.all([
    SessionStore.open(`${dir}/s.kv`, 60_000, generations),
    SessionStore.open(`${dir}/s.kv`, 60_000, WriteGenerations.from(generations.buffer)),
  ]);
  const turn = (text: string) => [
    { role: "user" as const, content: text, tokens: 5 },
    { role: "assistant" as const, content: `re: ${text}`, tokens: 5 },
  ];
  try {
    await a.commitTurn("p", "s", await a.load("p", "s"), 0, turn("one"));
    const cached = await a.load("p", "s");
    equal(await a.load("p", "s"), cached, "an unchanged session is served from memory");
    await b.commitTurn("p", "s", await b.load("p", "s"), 0, turn("two"));
    deepEqual((await a.load("p", "s")).history.map((m) => m.content), [
      "one",
      "re: one",
      "two",
      "re: two",
    ]);
    await b.clear("p", "s");
    deepEqual((await a.load("p", "s")).history, []);
  } finally {
    a.close();
    b.close();
    await removeTempDir(dir);
  }
});

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

Deno.test("token bound: never below the UTF-8 size, whatever the script", () => {
  for (const text of ["hello", "héllo wörld", "迷宫的出口在哪里", "🙂🙃 emoji", "\ud800 lone"]) {
    const bytes = new TextEncoder().encode(text).length;
    assert(messageTokenBound(text) >= bytes, text);
  }
});

Deno.test("prompts: a prompt file's pointer to the docs names a section that exists", async () => {
  let pointers = 0;
  for await (const entry of Deno.readDir(new URL("../prompts", import.meta.url))) {
    const text = await Deno.readTextFile(new URL(`../prompts/${entry.name}`, import.meta.url));
    // `(see docs/protocol.md, "Project files")`, and the README as a place that moves.
    for (const [, file, section] of text.matchAll(/see ([\w./-]+\.md|README), "([^"]+)"/g)) {
      pointers++;
      const doc = await Deno.readTextFile(new URL(`../${file}`, import.meta.url)).catch(() => "");
      assert(
        new RegExp(`^#+ ${section}$`, "m").test(doc),
        `prompts/${entry.name} points at "${section}" in ${file}, which has no such section`,
      );
    }
  }
  assert(pointers > 0, "no pointer found: the pattern no longer matches the prompt files");
});
