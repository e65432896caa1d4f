/**
 * Unit tests of lib/config: the option table's defaults, units and suffixes,
 * the environment fallbacks, the errors, and the frozen result.
 *
 * @module
 */

import assert, { deepEqual, equal, match, throws } from "node:assert/strict";
import {
  type Config,
  ConfigError,
  helpText,
  parseConfig,
  versionText,
} from "../../lib/config/config.ts";
import { defaultText } from "../../lib/config/option_spec.ts";
import { OPTIONS, type OptionSpec } from "../../lib/config/options.ts";
import {
  formatDuration,
  formatSize,
  parseBoolean,
  parseDuration,
  parseSize,
} from "../../lib/config/values.ts";

const TABLE: readonly OptionSpec[] = OPTIONS;

function config(argv: string[], env: Record<string, string> = {}): Config {
  const result = parseConfig(argv, env, () => "file-secret\n");
  if (result.help) throw new Error("unexpected help");
  return result.config;
}

/** The ConfigError `fn` throws, checked to name `option` (and `value` when given). */
function configError(fn: () => unknown, option: string, value?: string): ConfigError {
  try {
    fn();
  } catch (error) {
    assert(error instanceof ConfigError, String(error));
    equal(error.option, option);
    match(error.message, new RegExp(`'--${option}'`));
    if (value !== undefined) {
      equal(error.value, value);
      assert(error.message.includes(JSON.stringify(value)), error.message);
    }
    return error;
  }
  throw new Error("no ConfigError");
}

Deno.test("config table: every option reads its own default, and fills a distinct field", () => {
  const fields = new Set<string>();
  for (const option of TABLE) {
    assert(!fields.has(option.field), `two options fill ${option.field}`);
    fields.add(option.field);
    const text = defaultText(option);
    if (text !== undefined) option.parse(text);
  }
  // ...and the defaults, read through the same readers, are the values the program had before
  // units were written out.
  const c = config([]);
  equal(c.requestTimeoutMs, 120_000);
  equal(c.engineWaitMs, 30_000);
  equal(c.simTtftMs, 50);
  equal(c.simItlMs, 15);
  equal(c.vllmStartupTimeoutMs, 900_000);
  equal(c.vllmStopGraceMs, 10_000);
  equal(c.orderWindowMs, 50);
  equal(c.instanceTimeoutMs, 10_000);
  equal(c.dedupWindowMs, 600_000);
  equal(c.sessionTtlMs, 3_600_000);
  equal(c.statsIntervalMs, 60_000);
  equal(c.shutdownTimeoutMs, 30_000);
  equal(c.maxPayloadBytes, 8_388_608);
  equal(c.maxImageBytes, 1_048_576);
  deepEqual(c.vllmArgs, []);
  deepEqual(c.loraModules, []);
  equal(c.servedModelName, c.model);
  equal(c.mqttUrl, undefined);
  equal(c.qos, 1);
  equal(c.mqttVersion, "auto");
});

Deno.test("config table: durations end in Ms, and every default shows its unit", () => {
  for (const option of TABLE) {
    if (option.kind !== "duration" && option.kind !== "size") continue;
    if (option.kind === "duration") {
      assert(option.field.endsWith("Ms"), `${option.field} holds milliseconds`);
      assert(option.unit === "ms" || option.unit === "s", `--${option.name} names its bare unit`);
    }
    match(String(option.default), /^(0|[\d.]+(ms|s|m|h|B|KiB|MiB|GiB))$/, `--${option.name}`);
    const row = `--${option.name}`;
    match(helpText(), new RegExp(`${row} <${option.kind}>.*\\n.*\\[default: ${option.default}`));
  }
});

Deno.test("config: a duration takes ms, s, m, h; a bare number keeps the option's old unit", () => {
  equal(config(["--request-timeout", "90s"]).requestTimeoutMs, 90_000);
  equal(config(["--request-timeout=1.5m"]).requestTimeoutMs, 90_000);
  equal(config(["--request-timeout", "2h"]).requestTimeoutMs, 7_200_000);
  equal(config(["--request-timeout", "2500ms"]).requestTimeoutMs, 2500);
  equal(config(["--request-timeout", "1.5S"]).requestTimeoutMs, 1500);
  // The original script's `--server_timeout 120` is still two minutes.
  equal(config(["--server_timeout", "120"]).requestTimeoutMs, 120_000);
  equal(config(["--shutdown-timeout=0.5"]).shutdownTimeoutMs, 500);
  equal(config(["--stats-interval=0.3"]).statsIntervalMs, 300);
  // Options that were in milliseconds stay so when bare.
  equal(config(["--order-window", "20"]).orderWindowMs, 20);
  equal(config(["--order-window", "1s"]).orderWindowMs, 1000);
  equal(config(["--sim-ttft", "0.2s", "--sim-itl=3"]).simTtftMs, 200);
  equal(config(["--sim-itl=3"]).simItlMs, 3);
  // The former names of the simulator's options still work.
  equal(config(["--sim-ttft-ms", "7", "--sim_itl_ms=2"]).simTtftMs, 7);
  equal(config(["--sim-itl-ms=2"]).simItlMs, 2);
});

Deno.test("config: a size takes B, KiB, MiB, GiB; a bare number is bytes", () => {
  equal(config(["--max-image-bytes", "64KiB"]).maxImageBytes, 65_536);
  equal(config(["--max-image-bytes", "64kib"]).maxImageBytes, 65_536);
  equal(config(["--max-image-bytes", "4096"]).maxImageBytes, 4096);
  equal(config(["--max-payload-bytes", "8MiB"]).maxPayloadBytes, 8 * 1024 * 1024);
  equal(
    config(["--max-payload-bytes", "1GiB", "--payload-memory=4GiB"]).maxPayloadBytes,
    1024 ** 3,
  );
  equal(config(["--payload-memory", "0"]).payloadMemory, 0);
  equal(config(["--max-image-bytes", "1.5KiB"]).maxImageBytes, 1536);
});

Deno.test("config: a bad value is a ConfigError naming the option and the value", () => {
  for (
    const [argv, option, value, what] of [
      [["--request-timeout", "5x"], "request-timeout", "5x", /a duration such as/],
      [["--request-timeout", "ms"], "request-timeout", "ms", /a duration such as/],
      [["--request-timeout", "0.5s"], "request-timeout", "0.5s", /at least 1s/],
      [["--engine-wait", "-1s"], "engine-wait", "-1s", /at least 0/],
      [["--instance-timeout=500ms"], "instance-timeout", "500ms", /at least 1s/],
      [["--stats-interval", "50ms"], "stats-interval", "50ms", /at least 100ms/],
      [["--max-image-bytes", "1MB"], "max-image-bytes", "1MB", /a size such as/],
      [["--max-image-bytes", "1000.5"], "max-image-bytes", "1000.5", /whole number of bytes/],
      [["--max-image-bytes", "512"], "max-image-bytes", "512", /at least 1KiB/],
      [["--max-tokens", "0"], "max-tokens", "0", /at least 1/],
      [["--max-model-len", "4096.5"], "max-model-len", "4096.5", /an integer/],
      [["--temperature", "warm"], "temperature", "warm", /a number/],
      [["--qos", "3"], "qos", "3", /at most 2/],
      [["--mqtt-version", "3"], "mqtt-version", "3", /one of auto, 5, 4/],
      [["--engine", "gpu"], "engine", "gpu", /one of vllm, url, sim/],
      [["--stream=maybe"], "stream", "maybe", /true or false/],
      [["--projects", "a/b"], "projects", "a/b", /\[A-Za-z0-9._-\]/],
      [["--topic-prefix", "a/#"], "topic-prefix", "a/#", /\+ #/],
      [["--share-group", "a/b"], "share-group", "a/b", /one topic level/],
      [["--kv-url", "kv.example:4512"], "kv-url", "kv.example:4512", /http\(s\) URL/],
      [["--lora-modules", "adapter"], "lora-modules", "adapter", /NAME=PATH/],
      [["--sim-quality", "sim-model=1.5"], "sim-quality", "sim-model=1.5", /from 0 to 1/],
    ] as const
  ) {
    const error = configError(() => config([...argv]), option, value);
    equal(error.code, "bad_value", argv.join(" "));
    match(error.message, what);
  }
});

Deno.test("config: other mistakes carry their own codes", () => {
  equal(configError(() => config(["--bogus"]), "bogus").code, "unknown_option");
  equal(configError(() => config(["--model"]), "model").code, "missing_value");
  equal(configError(() => config(["--engine", "url"]), "engine-url").code, "missing_value");
  equal(configError(() => config(["--max-tokens", "5000"]), "max-tokens").code, "conflict");
  equal(
    configError(() => config(["--max-payload-bytes", "100MiB"]), "payload-memory").code,
    "conflict",
  );
  equal(
    configError(() => config(["--vision-model", "--max-images", "0"]), "max-images").code,
    "conflict",
  );
  const secret = configError(() => config(["--session-secret", "short"]), "session-secret");
  assert(!secret.message.includes("short"), "a secret is never in the message");
  equal(secret.value, undefined);
  const stray = (() => {
    try {
      config(["maze"]);
    } catch (error) {
      return error;
    }
  })();
  assert(stray instanceof ConfigError);
  equal(stray.code, "unexpected_argument");
  equal(new ConfigError("elsewhere").code, "invalid");
  throws(() =>
    parseConfig(["--mqtt-password-file", "/missing"], {}, () => {
      throw new Error("no such file");
    }), (error) => error instanceof ConfigError && error.code === "unreadable_file");
});

Deno.test("config: the environment fills what the command line leaves out", () => {
  const env = {
    VLLM_MQTT_ORDER_WINDOW: "2s",
    VLLM_MQTT_REQUEST_TIMEOUT: "45",
    VLLM_MQTT_MAX_IMAGE_BYTES: "512KiB",
    VLLM_MQTT_SIM_TTFT_MS: "9",
    VLLM_MQTT_PROJECTS: "maze driving",
    VLLM_MQTT_STREAM: "false",
    VLLM_MQTT_MODEL: "",
  };
  const c = config([], env);
  equal(c.orderWindowMs, 2000);
  equal(c.requestTimeoutMs, 45_000);
  equal(c.maxImageBytes, 512 * 1024);
  equal(c.simTtftMs, 9);
  deepEqual(c.projects, ["maze", "driving"]);
  equal(c.stream, false);
  equal(c.model, "Qwen/QwQ-32B", "an empty variable counts as unset");
  // The command line wins, and the current name's variable wins over a former name's.
  equal(config(["--order-window=5"], env).orderWindowMs, 5);
  equal(config([], { ...env, VLLM_MQTT_SIM_TTFT: "1s" }).simTtftMs, 1000);
  configError(() => config([], { VLLM_MQTT_SESSION_TTL: "soon" }), "session-ttl", "soon");
});

Deno.test("config: the result is frozen, lists inside it too", () => {
  const c = config([
    "--projects=maze,maze,driving",
    "--lora-modules",
    "a=/x",
    "b=/y",
    "--vllm-args=--enforce-eager  --seed 1",
  ]);
  assert(Object.isFrozen(c));
  deepEqual(c.projects, ["maze", "driving"]);
  assert(Object.isFrozen(c.projects));
  deepEqual(c.loraModules, [{ name: "a", path: "/x" }, { name: "b", path: "/y" }]);
  deepEqual(config(["--sim-quality", "sim-model=0.8,a=0.6"]).simQuality, {
    "sim-model": 0.8,
    a: 0.6,
  });
  assert(Object.isFrozen(c.loraModules) && Object.isFrozen(c.loraModules[0]));
  deepEqual(c.vllmArgs, ["--enforce-eager", "--seed", "1"]);
  assert(Object.isFrozen(c.vllmArgs));
  assert(Object.isFrozen(c.warnings));
  throws(() => {
    (c as { maxTokens: number }).maxTokens = 1;
  }, TypeError);
});

Deno.test("config: --help asks for help before any value is read", () => {
  deepEqual(parseConfig(["--max-tokens", "0", "--help"], {}), { help: true, show: "help" });
  deepEqual(parseConfig(["-h"], {}), { help: true, show: "help" });
});

Deno.test("values: readers and writers of durations, sizes and booleans", () => {
  equal(parseDuration("250ms", "s"), 250);
  equal(parseDuration("250", "s"), 250_000);
  equal(parseDuration("250", "ms"), 250);
  equal(parseDuration(" 5 m ", "ms"), 300_000);
  equal(parseDuration("1e3", "ms"), 1000);
  equal(parseDuration("5 parsecs", "s"), undefined);
  equal(parseDuration("", "s"), undefined);
  equal(parseDuration("Infinity", "s"), undefined);
  equal(parseSize("6MiB"), 6_291_456);
  equal(parseSize("7b"), 7);
  equal(parseSize("1KB"), undefined);
  equal(formatDuration(7_200_000), "2h");
  equal(formatDuration(90_000), "90s");
  equal(formatDuration(1500), "1500ms");
  equal(formatDuration(0), "0");
  equal(formatSize(6_291_456), "6MiB");
  equal(formatSize(1000), "1000B");
  for (const ms of [1, 999, 1000, 60_000, 61_000, 3_600_000, 5_400_000]) {
    equal(parseDuration(formatDuration(ms), "s"), ms);
  }
  equal(parseBoolean("False"), false);
  equal(parseBoolean("ON"), true);
  equal(parseBoolean("maybe"), undefined);
});

Deno.test("config: --reply-topics takes topic filters with the three placeholders only", () => {
  deepEqual(config([]).replyTopics, ["{project}/assistant_response/{session_id}/#"]);
  deepEqual(
    config(["--reply-topics", "{project}/assistant_response/{session_id}/#,replies/{username}/+"])
      .replyTopics,
    ["{project}/assistant_response/{session_id}/#", "replies/{username}/+"],
  );
  for (const bad of ["$SYS/#", "a/#/b", "a/b#", "a+/b", "replies/{user}", "{project}x{"]) {
    configError(() => config(["--reply-topics", bad]), "reply-topics", bad);
  }
  configError(() => config([], { VLLM_MQTT_OPERATOR_TOKEN: "short" }), "operator-token");
  equal(
    config([], { VLLM_MQTT_OPERATOR_TOKEN: "operator-Token-0123456789" }).operatorToken,
    "operator-Token-0123456789",
  );
});

Deno.test("config: a mistyped option is named with the one it most likely meant", () => {
  throws(
    () => config(["--projets", "maze"]),
    /unknown option '--projets' \(did you mean '--projects'\? see --help\)/,
  );
  throws(() => config(["--max_model_lenn=4096"]), /did you mean '--max-model-len'\?/);
  // Nothing near: no guess.
  throws(() => config(["--bogus"]), /unknown option '--bogus' \(see --help\)/);
});

Deno.test("config: --version asks for the version line, --help for the help", () => {
  deepEqual(parseConfig(["--version"], {}), { help: true, show: "version" });
  deepEqual(parseConfig(["--engine=sim", "--help"], {}), { help: true, show: "help" });
  match(versionText(), /^vllm-mqtt \d+\.\d+\.\d+ \(deno \d+\.\d+\.\d+, protocol v1\)$/);
});

Deno.test("config: --help lists each option's choices, and says what a project without a file gets", () => {
  const text = helpText();
  match(text, /--log-level <string>\n.*\[one of: debug, info, warning, error; default: info\]/);
  match(text, /--log-format <string>\n.*one of: text, json/);
  assert(!/needs prompts\/NAME\.md/.test(text), text);
  match(text, /or by the general prompt when there is none/);
});

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

Deno.test("config: several engines: --engine-url takes a list, --visible-devices groups, --sim-engines, --route-policy", () => {
  const one = config(["--engine=url", "--engine-url=http://a:8000/v1/"]);
  deepEqual([one.engineUrl, one.engineUrls], ["http://a:8000/v1", ["http://a:8000/v1"]]);
  const two = config(["--engine=url", "--engine-url=http://a:8000/v1, http://b:8000/v1/"]);
  deepEqual(two.engineUrls, ["http://a:8000/v1", "http://b:8000/v1"]);
  equal(two.engineUrl, "http://a:8000/v1");
  configError(
    () => config(["--engine=url", "--engine-url=http://a:8000/v1,not a url"]),
    "engine-url",
    "not a url",
  );
  deepEqual(config([]).gpuGroups, []);
  deepEqual(config(["--visible-devices=0,1"]).gpuGroups, ["0,1"]);
  deepEqual(config(["--visible-devices=0,1;2,3"]).gpuGroups, ["0,1", "2,3"]);
  configError(() => config(["--visible-devices=0,1;"]), "visible-devices", "0,1;");
  configError(
    () => config(["--visible-devices=0,1,2;3,4,5", "--pipeline-parallel-size=2"]),
    "visible-devices",
  );
  deepEqual([config([]).simEngines, config([]).routePolicy], [1, "cache-aware"]);
  equal(config(["--sim-engines=3"]).simEngines, 3);
  configError(() => config(["--route-policy=random"]), "route-policy", "random");
});
