/**
 * Start-up configuration: the command line and the environment, parsed once
 * into a typed, frozen {@linkcode Config}. A bad value stops start-up with a
 * {@linkcode ConfigError} naming the option.
 *
 * Flags are accepted as `--name value`, `--name=value`, with underscores in
 * place of dashes (`--max_model_len`, as the original Python script took them),
 * and booleans as `--flag`, `--no-flag`, `--flag=false` or `--flag False`.
 *
 * @module
 */

import { payloadRoomForImages } from "../protocol/images.ts";
import { envName, OPTIONS, type OptionSpec } from "./options.ts";

/** Raised when the command line or the environment holds a bad value. */
export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ConfigError";
  }
}

/** `NAME=PATH` of `--lora-modules`, read. */
function loraModule(value: string): { readonly name: string; readonly path: string } {
  const [, name, path] = /^([^=\s]+)=(\S+)$/.exec(value) ?? [];
  if (name === undefined) {
    throw new ConfigError(`'--lora-modules' takes NAME=PATH entries: current value has ${value}`);
  }
  return Object.freeze({ name, path });
}

/** Which engine answers the requests. */
export type EngineMode = "vllm" | "url" | "sim";

/** The program's whole configuration, validated. */
export interface Config {
  readonly projects: readonly string[];
  readonly promptsDir: string;
  readonly controlTopics: boolean;
  readonly answerUnknownProjects: boolean;
  /** Requests only on per-session input topics (a broker ACL decides who writes which). */
  readonly sessionTopicsOnly: boolean;
  /** The secret that signs session ids; undefined takes any valid id. */
  readonly sessionSecret: string | undefined;

  readonly engine: EngineMode;
  readonly engineUrl: string | undefined;
  readonly engineApiKey: string | undefined;
  readonly model: string;
  readonly servedModelName: string;
  readonly maxModelLen: number;
  readonly requestTimeoutMs: number;
  readonly engineRetries: number;
  readonly engineWaitMs: number;
  readonly skipThinking: boolean;
  readonly simTtftMs: number;
  readonly simItlMs: number;

  readonly tensorParallelSize: number;
  readonly gpuMemoryUtilization: number;
  readonly quantization: string | undefined;
  readonly pipelineParallelSize: number;
  readonly dtype: string;
  readonly trustRemoteCode: boolean;
  readonly enforceEager: boolean;
  /** The model takes images: vLLM gets `--limit-mm-per-prompt {"image": maxImages}`. */
  readonly visionModel: boolean;
  readonly vllmArgs: readonly string[];
  /** LoRA adapters served beside the model (`--lora-modules NAME=PATH`). */
  readonly loraModules: readonly { readonly name: string; readonly path: string }[];
  readonly vllmStartupTimeoutMs: number;
  readonly vllmMaxRestarts: number;
  readonly vllmStopGraceMs: number;
  readonly visibleDevices: string | undefined;
  readonly modelProvider: string;
  /** vLLM's `--download-dir`. */
  readonly modelCacheDir: string | undefined;
  /** vLLM's `--revision`. */
  readonly modelRevision: string | undefined;
  /** False: vLLM loads only models already cached (offline). */
  readonly autoDownload: boolean;

  /** The broker to connect to; undefined means localhost or the embedded broker. */
  readonly mqttUrl: string | undefined;
  readonly embeddedBrokerPort: number;
  readonly mqttClientId: string;
  /** Shared-subscription group, for several instances; undefined: one instance. */
  readonly shareGroup: string | undefined;
  /** With `shareGroup`: milliseconds a turn waits for earlier turns to reach the store. */
  readonly orderWindowMs: number;
  /** With `shareGroup`: milliseconds without a heartbeat before an instance counts as gone. */
  readonly instanceTimeoutMs: number;
  readonly mqttUsername: string | undefined;
  readonly mqttPassword: string | undefined;
  /** Where the password came from, if from a file (read access is checked at start). */
  readonly mqttPasswordFile: string | undefined;
  readonly mqttVersion: 4 | 5;
  readonly qos: 0 | 1 | 2;
  readonly topicPrefix: string;
  readonly serviceName: string;
  readonly tlsCa: string | undefined;
  readonly tlsCert: string | undefined;
  readonly tlsKey: string | undefined;

  readonly workers: number;
  readonly maxInFlight: number;
  readonly maxQueue: number;
  readonly maxPriority: number;
  readonly maxPayloadBytes: number;
  readonly maxMessageChars: number;
  /** Images per request; 0: none taken. */
  readonly maxImages: number;
  /** Decoded bytes per image. */
  readonly maxImageBytes: number;
  /** Whether http(s) image URLs are passed on for the engine to fetch. */
  readonly remoteImages: boolean;
  readonly dedupWindowMs: number;
  /** Requests per minute per session; 0: off. */
  readonly rateLimit: number;
  /** Requests per minute per client id; 0: off. */
  readonly rateLimitClient: number;
  readonly rateLimitBurst: number;

  readonly dataDir: string;
  /** A remote Deno KV (KV Connect) holding the sessions instead of `{dataDir}/sessions.kv`. */
  readonly kvUrl: string | undefined;
  readonly sessionTtlMs: number;
  readonly maxSessions: number;
  readonly maxHistoryTokens: number;
  /** Share of the history budget trimming drops down to. */
  readonly trimLowWater: number;

  readonly maxTokens: number;
  /** Upper bound of a request's max_tokens; 0: only the model's context. */
  readonly maxTokensCap: number;
  readonly temperature: number;
  readonly topP: number;
  readonly stream: boolean;

  readonly statsIntervalMs: number;
  readonly shutdownTimeoutMs: number;
  /** 0: no HTTP endpoint. */
  readonly httpPort: number;
  readonly httpHost: string;
  readonly logLevel: "debug" | "info" | "warning" | "error";
  readonly logFormat: "text" | "json";
  /** Whether `/` serves the operator's live page. */
  readonly dashboard: boolean;
  /** The bearer token the live page needs; undefined: none. */
  readonly dashboardToken: string | undefined;
  /** Whether the live page's "try it" panel is served. */
  readonly dashboardTryIt: boolean;

  /** Warnings found while parsing (a secret on the command line); logged once logging is up. */
  readonly warnings: readonly string[];
}

/** What {@linkcode parseConfig} returns: a configuration, or a request for help. */
export type ParseResult = { help: true } | { help: false; config: Config };

type Value = string | number | boolean | readonly string[];

const BY_NAME = new Map<string, OptionSpec>();
for (const option of OPTIONS) {
  BY_NAME.set(option.name, option);
  for (const alias of option.aliases ?? []) BY_NAME.set(alias, option);
}

function parseBoolean(text: string): boolean | undefined {
  const lower = text.toLowerCase();
  if (["true", "1", "yes", "on"].includes(lower)) return true;
  if (["false", "0", "no", "off"].includes(lower)) return false;
  return undefined;
}

function convert(option: OptionSpec, raw: string): Value {
  const bad = (what: string) =>
    new ConfigError(`'--${option.name}' must be ${what}: current value is ${JSON.stringify(raw)}`);
  if (option.choices && !option.choices.includes(raw)) {
    throw bad(`one of ${option.choices.join(", ")}`);
  }
  switch (option.kind) {
    case "string":
      return raw;
    case "list":
      return raw.split(/[\s,]+/).filter((item) => item !== "");
    case "boolean": {
      const value = parseBoolean(raw);
      if (value === undefined) throw bad("true or false");
      return value;
    }
    case "int":
    case "number": {
      const value = Number(raw);
      if (raw.trim() === "" || !Number.isFinite(value)) throw bad("a number");
      if (option.kind === "int" && !Number.isInteger(value)) throw bad("an integer");
      if (option.min !== undefined && value < option.min) throw bad(`at least ${option.min}`);
      if (option.max !== undefined && value > option.max) throw bad(`at most ${option.max}`);
      return value;
    }
  }
}

/** Reads `argv` into raw values by option name, and notes secrets given there. */
function readArgs(
  argv: readonly string[],
): { values: Map<string, Value>; help: boolean; warnings: string[] } {
  const values = new Map<string, Value>();
  const warnings: string[] = [];
  let help = false;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--help" || arg === "-h") {
      help = true;
      continue;
    }
    if (!arg.startsWith("--")) {
      throw new ConfigError(`unexpected argument ${JSON.stringify(arg)}: options start with --`);
    }
    const eq = arg.indexOf("=");
    let name = (eq === -1 ? arg.slice(2) : arg.slice(2, eq)).replaceAll("_", "-");
    let inline = eq === -1 ? undefined : arg.slice(eq + 1);
    let option = BY_NAME.get(name);
    if (!option && name.startsWith("no-") && BY_NAME.get(name.slice(3))?.kind === "boolean") {
      option = BY_NAME.get(name.slice(3))!;
      name = option.name;
      if (inline !== undefined) throw new ConfigError(`'--${name}' negated takes no value`);
      inline = "false";
    }
    if (!option) throw new ConfigError(`unknown option '--${name}' (see --help)`);
    let raw: string;
    if (inline !== undefined) {
      raw = inline;
    } else if (option.kind === "boolean") {
      // Python fire's form: `--skip_thinking False`.
      const next = argv[i + 1];
      if (next !== undefined && parseBoolean(next) !== undefined) {
        raw = next;
        i++;
      } else {
        raw = "true";
      }
    } else {
      const next = argv[i + 1];
      if (next === undefined || (next.startsWith("--") && next.length > 2)) {
        throw new ConfigError(`'--${option.name}' needs a value`);
      }
      raw = next;
      i++;
      // `--projects maze driving`: later bare words belong to a list.
      while (option.kind === "list" && argv[i + 1] !== undefined && !argv[i + 1].startsWith("--")) {
        raw += ` ${argv[++i]}`;
      }
    }
    if (option.secret) {
      warnings.push(
        `'--${option.name}' on the command line is visible to other users of this machine; use ${
          envName(option)
        } instead`,
      );
    }
    values.set(option.name, convert(option, raw));
  }
  return { values, help, warnings };
}

/**
 * Parses the command line and the environment into a frozen {@linkcode Config}.
 *
 * @param argv The arguments after the program name.
 * @param env The environment to read `VLLM_MQTT_*` fallbacks from.
 * @throws {ConfigError} When a value is missing, unknown or out of range.
 */
export function parseConfig(
  argv: readonly string[],
  env: Readonly<Record<string, string | undefined>>,
  readTextFile: (path: string) => string = Deno.readTextFileSync,
): ParseResult {
  const { values, help, warnings } = readArgs(argv);
  if (help) return { help: true };

  const get = <T extends Value | undefined>(name: string): T => {
    const option = BY_NAME.get(name)!;
    if (values.has(name)) return values.get(name) as T;
    const fromEnv = env[envName(option)];
    if (fromEnv !== undefined && fromEnv !== "") return convert(option, fromEnv) as T;
    return option.default as T;
  };

  const given = (name: string) => {
    const option = BY_NAME.get(name)!;
    return values.has(name) || (env[envName(option)] ?? "") !== "";
  };
  // The original llama.cpp script's `--server_url`: attach to that server.
  const serverUrl = get<string | undefined>("server-url");
  const engine = serverUrl !== undefined && !given("engine") ? "url" : get<EngineMode>("engine");
  const engineUrl = get<string | undefined>("engine-url") ?? serverUrl;
  if (engine === "url" && !engineUrl) {
    throw new ConfigError("'--engine url' needs '--engine-url', e.g. http://gpu-box:8000/v1");
  }
  if (engineUrl !== undefined && !URL.canParse(engineUrl)) {
    throw new ConfigError(`'--engine-url' must be a URL: current value is "${engineUrl}"`);
  }

  let mqttUrl = get<string | undefined>("mqtt-url");
  const mqttBroker = get<string | undefined>("mqtt-broker");
  if (!mqttUrl && mqttBroker) {
    mqttUrl = mqttBroker.includes("://")
      ? mqttBroker
      : `mqtt://${mqttBroker}:${get<number>("mqtt-port")}`;
  }
  if (mqttUrl !== undefined) {
    const parsed = URL.canParse(mqttUrl) ? new URL(mqttUrl) : undefined;
    if (!parsed || !["mqtt:", "mqtts:", "ws:", "wss:", "tcp:", "ssl:"].includes(parsed.protocol)) {
      throw new ConfigError(
        `'--mqtt-url' must be an mqtt://, mqtts://, ws:// or wss:// URL: current value is "${mqttUrl}"`,
      );
    }
  }

  let mqttPassword = get<string | undefined>("mqtt-password");
  const passwordFile = get<string | undefined>("mqtt-password-file");
  if (!mqttPassword && passwordFile) {
    try {
      mqttPassword = readTextFile(passwordFile).trim();
    } catch (error) {
      // Without read access, the start-up's permission check names the command that grants it.
      if (!(error instanceof Deno.errors.NotCapable)) {
        throw new ConfigError(
          `'--mqtt-password-file' could not be read: ${(error as Error).message}`,
        );
      }
    }
  }

  const projects = get<readonly string[]>("projects");
  if (projects.length === 0) throw new ConfigError("'--projects' must name at least one project");
  for (const project of projects) {
    if (!/^[A-Za-z0-9._-]{1,64}$/.test(project)) {
      throw new ConfigError(
        `'--projects' names must match [A-Za-z0-9._-]{1,64}: current value is "${project}"`,
      );
    }
  }

  const topicPrefix = get<string>("topic-prefix");
  if (/[+#\0]/.test(topicPrefix)) {
    throw new ConfigError(
      `'--topic-prefix' must not hold + # or NUL: current value is "${topicPrefix}"`,
    );
  }

  const sessionSecret = get<string | undefined>("session-secret");
  if (sessionSecret !== undefined && sessionSecret.length < 16) {
    throw new ConfigError(
      `'--session-secret' must be at least 16 characters long: it has ${sessionSecret.length}`,
    );
  }

  const model = get<string>("model");
  const config: Config = {
    projects: Object.freeze([...new Set(projects)]),
    promptsDir: get("prompts-dir"),
    controlTopics: get("control-topics"),
    answerUnknownProjects: get("answer-unknown-projects"),
    sessionTopicsOnly: get("session-topics-only"),
    sessionSecret,
    engine,
    engineUrl: engineUrl?.replace(/\/+$/, ""),
    engineApiKey: get("engine-api-key"),
    model,
    servedModelName: get<string | undefined>("served-model-name") ?? model,
    maxModelLen: get("max-model-len"),
    requestTimeoutMs: get<number>("request-timeout") * 1000,
    engineRetries: get("engine-retries"),
    engineWaitMs: get<number>("engine-wait") * 1000,
    skipThinking: get("skip-thinking"),
    simTtftMs: get("sim-ttft-ms"),
    simItlMs: get("sim-itl-ms"),
    tensorParallelSize: get("tensor-parallel-size"),
    gpuMemoryUtilization: get("gpu-memory-utilization"),
    quantization: get("quantization"),
    pipelineParallelSize: get("pipeline-parallel-size"),
    dtype: get("dtype"),
    trustRemoteCode: get("trust-remote-code"),
    enforceEager: get("enforce-eager"),
    visionModel: get("vision-model"),
    vllmArgs: Object.freeze(get<string>("vllm-args").split(/\s+/).filter((arg) => arg !== "")),
    loraModules: Object.freeze(get<readonly string[]>("lora-modules").map(loraModule)),
    vllmStartupTimeoutMs: get<number>("vllm-startup-timeout") * 1000,
    vllmMaxRestarts: get("vllm-max-restarts"),
    vllmStopGraceMs: get<number>("vllm-stop-grace") * 1000,
    visibleDevices: get("visible-devices"),
    modelProvider: get("model-provider"),
    modelCacheDir: get("model-cache-dir"),
    modelRevision: get("model-revision"),
    autoDownload: get("auto-download"),
    mqttUrl,
    embeddedBrokerPort: get("embedded-broker-port"),
    mqttClientId: get("mqtt-client-id"),
    shareGroup: get("share-group"),
    orderWindowMs: get("order-window"),
    instanceTimeoutMs: get<number>("instance-timeout") * 1000,
    mqttUsername: get("mqtt-username"),
    mqttPassword,
    mqttPasswordFile: passwordFile,
    mqttVersion: get<number>("mqtt-version") as 4 | 5,
    qos: get<number>("qos") as 0 | 1 | 2,
    topicPrefix,
    serviceName: get("service-name"),
    tlsCa: get("tls-ca"),
    tlsCert: get("tls-cert"),
    tlsKey: get("tls-key"),
    workers: get("workers"),
    maxInFlight: get("max-in-flight"),
    maxQueue: get("max-queue"),
    maxPriority: get("max-priority"),
    maxPayloadBytes: get("max-payload-bytes"),
    maxMessageChars: get("max-message-chars"),
    maxImages: get("max-images"),
    maxImageBytes: get("max-image-bytes"),
    remoteImages: get("remote-images"),
    dedupWindowMs: get<number>("dedup-window") * 1000,
    rateLimit: get("rate-limit"),
    rateLimitClient: get("rate-limit-client"),
    rateLimitBurst: get("rate-limit-burst"),
    dataDir: get("data-dir"),
    kvUrl: get("kv-url"),
    sessionTtlMs: get<number>("session-ttl") * 1000,
    maxSessions: get("max-sessions"),
    maxHistoryTokens: get("max-history-tokens"),
    trimLowWater: get("trim-low-water"),
    maxTokens: get("max-tokens"),
    maxTokensCap: get("max-tokens-cap"),
    temperature: get("temperature"),
    topP: get("top-p"),
    stream: get("stream"),
    statsIntervalMs: get<number>("stats-interval") * 1000,
    shutdownTimeoutMs: get<number>("shutdown-timeout") * 1000,
    httpPort: get("http-port"),
    httpHost: get("http-host"),
    dashboard: get("dashboard"),
    dashboardToken: get("dashboard-token"),
    dashboardTryIt: get("dashboard-try-it"),
    // The original script's `--enable_debug_logging` asks for what `--log-level debug` does.
    logLevel: get<boolean>("enable-debug-logging") && !given("log-level")
      ? "debug"
      : get("log-level"),
    logFormat: get("log-format"),
    warnings: Object.freeze(warnings),
  };
  if (config.shareGroup !== undefined && !/^[^/+#\s]+$/.test(config.shareGroup)) {
    throw new ConfigError(
      `'--share-group' must be one topic level without / + # or spaces: current value is ${config.shareGroup}`,
    );
  }
  if (config.kvUrl !== undefined && !/^https?:\/\/[^/]/.test(config.kvUrl)) {
    throw new ConfigError(
      `'--kv-url' must be an http(s) URL of a KV Connect server: current value is ${config.kvUrl}`,
    );
  }
  // A payload limit smaller than what the image limits allow would refuse allowed images whole.
  const imageRoom = payloadRoomForImages(config.maxImages, config.maxImageBytes);
  if (config.maxPayloadBytes < imageRoom) {
    throw new ConfigError(
      `'--max-payload-bytes' (${config.maxPayloadBytes}) is too small for what '--max-images' ` +
        `(${config.maxImages}) and '--max-image-bytes' (${config.maxImageBytes}) allow: that many ` +
        `images as base64 with the message take up to ${imageRoom} bytes; raise ` +
        `'--max-payload-bytes' to at least ${imageRoom}, lower the image limits, or take no ` +
        `images with '--max-images 0'`,
    );
  }
  if (config.visionModel && config.maxImages === 0) {
    throw new ConfigError("'--vision-model' needs '--max-images' above 0: it is 0");
  }
  if (config.maxTokens >= config.maxModelLen) {
    throw new ConfigError(
      `'--max-tokens' must be below '--max-model-len' (${config.maxModelLen}): current value is ${config.maxTokens}`,
    );
  }
  if (config.maxTokensCap > 0 && config.maxTokensCap < config.maxTokens) {
    throw new ConfigError(
      `'--max-tokens-cap' must be at least '--max-tokens' (${config.maxTokens}), or 0 for none: current value is ${config.maxTokensCap}`,
    );
  }
  if (config.dashboardToken !== undefined && config.dashboardToken.length < 16) {
    throw new ConfigError(
      `'--dashboard-token' must be at least 16 characters long: it has ${config.dashboardToken.length}`,
    );
  }
  return { help: false, config: Object.freeze(config) };
}

/** The `--help` text, generated from the option table. */
export function helpText(): string {
  const lines = [
    "vllm-mqtt: serve a large language model to MQTT clients",
    "",
    "Usage: deno task start [OPTIONS]",
    "",
    "Every option also reads VLLM_MQTT_<NAME> from the environment (NAME in upper snake case).",
    "Underscores may replace dashes (--max_model_len). Booleans: --flag, --no-flag, --flag=false.",
  ];
  let group = "";
  for (const option of OPTIONS) {
    if (option.group !== group) {
      group = option.group;
      lines.push("", `${group}:`);
    }
    const value = option.kind === "boolean" ? "" : ` <${option.kind}>`;
    const aliases = option.aliases?.length
      ? ` (also ${option.aliases.map((a) => `--${a}`).join(", ")})`
      : "";
    const fallback = option.default === undefined || option.default === ""
      ? ""
      : ` [default: ${Array.isArray(option.default) ? option.default.join(",") : option.default}]`;
    lines.push(`  --${option.name}${value}${aliases}`, `      ${option.help}${fallback}`);
  }
  return lines.join("\n");
}
