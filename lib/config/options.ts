/**
 * Every command-line option the program takes, in one table: its name, kind,
 * default, help text and the configuration field it fills. `--help`, the
 * environment fallbacks (`VLLM_MQTT_` + the name in upper snake case), the
 * type of the parsed values and docs/options.md all come from it.
 *
 * Durations and sizes take a unit suffix (`250ms`, `30s`, `5m`, `2h`; `64KiB`,
 * `6MiB`) and are held in milliseconds and bytes. A bare number keeps the
 * option's unit from before suffixes existed (its `unit`), so that command
 * lines written for the original Python script still mean what they meant.
 *
 * @module
 */

import { BROKER_PROFILES } from "../mqtt/broker_limits.ts";
import { ROUTE_POLICIES } from "../routing/router.ts";
import { badValue, ConfigError } from "./config_error.ts";
import {
  choice,
  duration,
  flag,
  int,
  list,
  num,
  type OptionSpec,
  size,
  text,
  transform,
} from "./option_spec.ts";

export type { OptionKind, OptionSpec } from "./option_spec.ts";

/** A LoRA adapter of `--lora-modules`. */
export interface LoraModule {
  readonly name: string;
  readonly path: string;
}

/** `NAME=PATH` of `--lora-modules`, read. */
function loraModule(value: string): LoraModule {
  // vLLM splits each entry at its first '=' (and reads a JSON object otherwise): a path
  // holding another '=' would reach it cut.
  const [, name, path] = /^([^=\s]+)=([^=\s]+)$/.exec(value) ?? [];
  if (name === undefined) throw badValue("lora-modules", "NAME=PATH entries", value);
  return Object.freeze({ name, path });
}

/**
 * `MODEL=QUALITY` entries of `--sim-quality`, read: how often (0 to 1) the
 * simulated engine's answers of each served model or adapter come out good.
 */
function simQuality(entries: readonly string[]): Readonly<Record<string, number>> {
  const qualities: Record<string, number> = {};
  for (const entry of entries) {
    const [, name, value] = /^([^=\s]+)=([0-9.]+)$/.exec(entry) ?? [];
    const quality = Number(value);
    if (name === undefined || !(quality >= 0 && quality <= 1)) {
      throw badValue("sim-quality", "MODEL=QUALITY entries with a quality from 0 to 1", entry);
    }
    qualities[name] = quality;
  }
  return Object.freeze(qualities);
}

/** Project names, each once; a name becomes a topic level and a file name, so it is plain. */
function projectNames(names: readonly string[]): readonly string[] {
  if (names.length === 0) {
    throw new ConfigError("'--projects' must name at least one project", {
      code: "bad_value",
      option: "projects",
      value: "",
    });
  }
  for (const project of names) {
    if (!/^[A-Za-z0-9._-]{1,64}$/.test(project)) {
      throw badValue("projects", "names matching [A-Za-z0-9._-]{1,64}", project);
    }
  }
  return Object.freeze([...new Set(names)]);
}

/** A secret's length check: the message gives its length, never the secret. */
function longSecret(option: string) {
  return (value: string | undefined): string | undefined => {
    if (value !== undefined && value.length < 16) {
      throw new ConfigError(
        `'--${option}' must be at least 16 characters long: it has ${value.length}`,
        { code: "bad_value", option },
      );
    }
    return value;
  };
}

/**
 * Reply topic patterns: MQTT topic filters (`+` and `#` whole levels, `#`
 * last) with only the known placeholders, not `$` topics.
 */
function replyTopicPatterns(patterns: readonly string[]): readonly string[] {
  const what =
    "MQTT topic filters ('+' and '#' whole levels, '#' last) with {project}, {session_id} or {username}, not starting with $";
  for (const pattern of patterns) {
    const levels = pattern.replace(/\{(project|session_id|username)\}/g, "x").split("/");
    const bad = pattern.startsWith("$") || /[{}\0]/.test(levels.join("/")) ||
      levels.some((level, i) =>
        (level.includes("+") && level !== "+") ||
        (level.includes("#") && (level !== "#" || i !== levels.length - 1))
      );
    if (bad) throw badValue("reply-topics", what, pattern);
  }
  return Object.freeze([...patterns]);
}

/** A check of a text value against a pattern, `what` saying what it must be. */
function matching<T extends string | undefined>(option: string, pattern: RegExp, what: string) {
  return (value: T): T => {
    if (value !== undefined && !pattern.test(value)) throw badValue(option, what, value);
    return value;
  };
}

const CORES = navigator.hardwareConcurrency ?? 2;

/** The option table. Order is the order of `--help`. */
export const OPTIONS = [
  // Projects and prompts
  transform(
    list({
      name: "projects",
      field: "projects",
      default: ["general"],
      group: "Projects",
      help:
        "Projects to serve, comma- or space-separated; each is prompted by prompts/NAME.md, or by the general prompt when there is none (refused when NAME is a letter or two from a prompt file's name: a typo)",
    }),
    projectNames,
  ),
  text({
    name: "prompts-dir",
    field: "promptsDir",
    default: "prompts",
    group: "Projects",
    help: "Folder holding one system prompt per project (NAME.md)",
  }),
  flag({
    name: "answer-unknown-projects",
    field: "answerUnknownProjects",
    default: false,
    group: "Projects",
    help:
      "Also subscribe +/user_input and answer `unknown_project` for projects not served (off: several services may share a broker, each with its projects)",
  }),
  flag({
    name: "session-topics-only",
    field: "sessionTopicsOnly",
    default: false,
    group: "Projects",
    help:
      "Take requests only on each session's own topic, {project}/user_input/{session_id}, which a broker ACL can grant to that session's user alone; the shared {project}/user_input answers `forbidden`",
  }),
  transform(
    text({
      name: "session-secret",
      field: "sessionSecret",
      secret: true,
      group: "Projects",
      help:
        "With a secret (16+ characters), only signed session ids ({name}~{signature}) are taken, and {project}/new_session/{nonce} hands out new ones (for brokers without per-user ACLs)",
    }),
    longSecret("session-secret"),
  ),
  transform(
    list({
      name: "reply-topics",
      field: "replyTopics",
      default: ["{project}/assistant_response/{session_id}/#"],
      group: "Projects",
      help:
        "Where a request may have its replies sent (its MQTT 5 Response Topic or `replyTopic`): MQTT topic filters under --topic-prefix with {project}, {session_id} and {username} (the session of the per-session input topic it came on); others are refused `forbidden`, as are, whatever these say, the topics the service subscribes to, its {service}/ topics and $ topics",
    }),
    replyTopicPatterns,
  ),
  transform(
    text({
      name: "operator-token",
      field: "operatorToken",
      secret: true,
      group: "Projects",
      help:
        "A secret (16+ characters) that control commands for every session of a project (`all`) must carry as `operator_token`; with --session-topics-only they are refused without it",
    }),
    longSecret("operator-token"),
  ),
  flag({
    name: "control-topics",
    field: "controlTopics",
    default: true,
    group: "Projects",
    help: "Serve {project}/clear_history, delete_session and template control topics",
  }),

  // Engine
  choice({
    name: "engine",
    field: "engine",
    default: "vllm",
    choices: ["vllm", "url", "sim"],
    group: "Engine",
    help:
      "vllm: start and supervise `vllm serve`; url: attach to --engine-url; sim: simulated engine",
  }),
  text({
    name: "engine-url",
    field: "engineUrl",
    group: "Engine",
    help:
      "OpenAI-compatible base URL for --engine url, e.g. http://gpu-box:8000/v1; several engines: their URLs separated by commas (see --route-policy)",
  }),
  text({
    name: "server-url",
    field: "serverUrl",
    group: "Engine",
    help:
      "The original llama.cpp script's form: attach to this OpenAI-compatible server (--engine url --engine-url URL, unless those are given)",
  }),
  text({
    name: "engine-api-key",
    field: "engineApiKey",
    secret: true,
    group: "Engine",
    help: "API key for --engine url (prefer the environment variable)",
  }),
  text({
    name: "model",
    field: "model",
    default: "Qwen/QwQ-32B",
    group: "Engine",
    help: "Model for vLLM to serve (and the model name sent to an attached engine)",
  }),
  text({
    name: "served-model-name",
    field: "servedModelName",
    group: "Engine",
    help: "Name the engine serves the model under (default: --model)",
  }),
  int({
    name: "max-model-len",
    field: "maxModelLen",
    default: 4096,
    min: 256,
    group: "Engine",
    help: "Context length of the model, in tokens",
  }),
  duration({
    name: "request-timeout",
    field: "requestTimeoutMs",
    unit: "s",
    default: "2m",
    min: "1s",
    aliases: ["server-timeout"],
    group: "Engine",
    help: "How long one request may take in the engine before it is answered with `timeout`",
  }),
  int({
    name: "engine-retries",
    field: "engineRetries",
    default: 2,
    min: 0,
    max: 10,
    group: "Engine",
    help: "Retries of a request the engine could not be reached for, before `engine_unavailable`",
  }),
  duration({
    name: "engine-wait",
    field: "engineWaitMs",
    unit: "s",
    default: "30s",
    min: "0",
    group: "Engine",
    help:
      "How long a request waits for an engine that is down (restarting, unreachable) before `engine_unavailable`",
  }),
  text({
    name: "tool-call-parser",
    field: "toolCallParser",
    default: "auto",
    group: "Engine",
    help:
      "vLLM's --tool-call-parser, given with --enable-auto-tool-choice when a project declares tools; auto: by the model's family (hermes for Qwen2.5/Qwen3/QwQ, llama3_json for Llama 3, mistral, ...); none: never",
  }),
  text({
    name: "reasoning-parser",
    field: "reasoningParser",
    default: "auto",
    group: "Engine",
    help:
      "vLLM's --reasoning-parser (managed vLLM and --engine sim get it; for --engine url, the one the engine runs); auto: by the model's family (deepseek_r1 for QwQ and DeepSeek-R1, qwen3 for Qwen3), and none for an attached engine; none: no parser",
  }),
  flag({
    name: "skip-thinking",
    field: "skipThinking",
    default: true,
    group: "Engine",
    help:
      "Remove <think>...</think> reasoning from replies and history; ask the model not to think",
  }),
  duration({
    name: "sim-ttft",
    aliases: ["sim-ttft-ms"],
    field: "simTtftMs",
    unit: "ms",
    default: "50ms",
    min: "0",
    group: "Engine",
    help: "Simulated engine: time to first token",
  }),
  duration({
    name: "sim-itl",
    aliases: ["sim-itl-ms"],
    field: "simItlMs",
    unit: "ms",
    default: "15ms",
    min: "0",
    group: "Engine",
    help: "Simulated engine: time between tokens at batch size 1 (grows with the batch)",
  }),
  transform(
    list({
      name: "sim-quality",
      field: "simQuality",
      default: [],
      group: "Engine",
      help:
        "Simulated engine: MODEL=QUALITY entries (0 to 1) for the served model and adapters; when set, every answer names its model, a hash of its system prompt and a good or bad outcome drawn with that probability (a bad game answer is not valid JSON), to test experiments against known truth",
    }),
    simQuality,
  ),
  int({
    name: "sim-engines",
    field: "simEngines",
    default: 1,
    min: 1,
    max: 64,
    group: "Engine",
    help: "Simulated engines to run side by side (--engine sim), each with its own prefix cache",
  }),
  choice({
    name: "route-policy",
    field: "routePolicy",
    default: "cache-aware",
    choices: ROUTE_POLICIES,
    group: "Engine",
    help:
      "With several engines, which one a turn goes to: cache-aware (the session's home engine, which holds its prefix, unless another saves more time to first token), round-robin, least-loaded, consistent-hash (by session)",
  }),

  // vLLM (managed mode)
  int({
    name: "tensor-parallel-size",
    field: "tensorParallelSize",
    default: 1,
    min: 1,
    group: "vLLM",
    help: "vLLM --tensor-parallel-size",
  }),
  num({
    name: "gpu-memory-utilization",
    field: "gpuMemoryUtilization",
    default: 0.9,
    min: 0.05,
    max: 1,
    group: "vLLM",
    help: "vLLM --gpu-memory-utilization",
  }),
  text({
    name: "quantization",
    field: "quantization",
    group: "vLLM",
    help: "vLLM --quantization (awq, gptq, fp8, ...)",
  }),
  int({
    name: "pipeline-parallel-size",
    field: "pipelineParallelSize",
    default: 1,
    min: 1,
    group: "vLLM",
    help: "vLLM --pipeline-parallel-size",
  }),
  text({
    name: "dtype",
    field: "dtype",
    default: "auto",
    group: "vLLM",
    help: "vLLM --dtype (auto, bfloat16, float16, ...)",
  }),
  flag({
    name: "trust-remote-code",
    field: "trustRemoteCode",
    default: false,
    group: "vLLM",
    help: "vLLM --trust-remote-code (runs the model repository's own code)",
  }),
  flag({
    name: "enforce-eager",
    field: "enforceEager",
    default: false,
    group: "vLLM",
    help: "vLLM --enforce-eager: no CUDA graphs (starts faster, runs slower)",
  }),
  transform(
    list({
      name: "lora-modules",
      field: "loraModules",
      default: [],
      group: "vLLM",
      help:
        "LoRA adapters served beside the model, as NAME=PATH (comma- or space-separated; vLLM --enable-lora --lora-modules); a project file's `model:` names one",
    }),
    (entries) => Object.freeze(entries.map(loraModule)),
  ),
  transform(
    int({
      name: "max-lora-rank",
      field: "maxLoraRank",
      default: 16,
      min: 1,
      max: 512,
      group: "vLLM",
      help:
        "vLLM --max-lora-rank, with --lora-modules: the largest adapter rank, one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (vLLM stops at start on a larger adapter)",
    }),
    (rank) => {
      // vLLM takes these ranks only (vllm/config/lora.py, MaxLoRARanks).
      if (![1, 8, 16, 32, 64, 128, 256, 320, 512].includes(rank)) {
        throw badValue("max-lora-rank", "one of 1, 8, 16, 32, 64, 128, 256, 320, 512", `${rank}`);
      }
      return rank;
    },
  ),
  int({
    name: "max-loras",
    field: "maxLoras",
    default: 1,
    min: 1,
    group: "vLLM",
    help:
      "vLLM --max-loras, with --lora-modules: adapters served in one batch (turns of other adapters wait)",
  }),
  transform(
    text({
      name: "vllm-args",
      field: "vllmArgs",
      default: "",
      group: "vLLM",
      help:
        "Further arguments for `vllm serve`, split on spaces with no shell quoting (so no argument can hold a space)",
    }),
    (args) => Object.freeze(args.split(/\s+/).filter((arg) => arg !== "")),
  ),
  duration({
    name: "vllm-startup-timeout",
    field: "vllmStartupTimeoutMs",
    unit: "s",
    default: "15m",
    min: "1s",
    group: "vLLM",
    help: "How long vLLM may take to become healthy (large models compile for minutes)",
  }),
  duration({
    name: "vllm-stop-grace",
    field: "vllmStopGraceMs",
    unit: "s",
    default: "10s",
    min: "0",
    group: "vLLM",
    help: "Time between SIGTERM and SIGKILL when vLLM is stopped",
  }),
  int({
    name: "vllm-max-restarts",
    field: "vllmMaxRestarts",
    default: 5,
    min: 0,
    group: "vLLM",
    help: "Crashes within 10 minutes after which the program gives up and exits non-zero",
  }),
  text({
    name: "visible-devices",
    field: "visibleDevices",
    group: "vLLM",
    help:
      "GPUs vLLM may use (sets CUDA_VISIBLE_DEVICES), e.g. 2 or 0,1; groups separated by ';' start one vLLM per group (\"0,1;2,3\": two, each with --tensor-parallel-size 2)",
  }),
  choice({
    name: "model-provider",
    field: "modelProvider",
    default: "auto",
    choices: ["auto", "modelscope", "local", "huggingface"],
    group: "vLLM",
    help: "Where vLLM loads the model from; modelscope sets VLLM_USE_MODELSCOPE=True",
  }),
  text({
    name: "model-cache-dir",
    field: "modelCacheDir",
    group: "vLLM",
    help: "Where vLLM downloads and keeps model weights (vLLM --download-dir)",
  }),
  text({
    name: "model-revision",
    field: "modelRevision",
    group: "vLLM",
    help: "Model revision (branch, tag or commit) to load (vLLM --revision)",
  }),
  flag({
    name: "auto-download",
    field: "autoDownload",
    default: true,
    group: "vLLM",
    help:
      "Let vLLM download a model it does not have; false: only what is cached (sets HF_HUB_OFFLINE=1)",
  }),
  flag({
    name: "vision-model",
    field: "visionModel",
    default: false,
    group: "vLLM",
    help: 'A VLM: vLLM gets --limit-mm-per-prompt {"image":N}, N = --max-images',
  }),
  flag({
    name: "audio-model",
    field: "audioModel",
    default: false,
    group: "vLLM",
    help:
      'An audio-language model (Qwen2-Audio, Ultravox): vLLM gets --limit-mm-per-prompt {"audio":N}, N = --max-audio-clips',
  }),

  // MQTT
  text({
    name: "mqtt-url",
    field: "mqttUrl",
    group: "MQTT",
    help:
      "Broker URL (mqtt://, mqtts://, ws://); absent: localhost:1883, or an embedded broker when nothing answers there",
  }),
  int({
    name: "embedded-broker-port",
    field: "embeddedBrokerPort",
    default: 1883,
    min: 0,
    max: 65535,
    group: "MQTT",
    help:
      "Without --mqtt-url: the localhost port probed for a broker, where the embedded one starts if none answers",
  }),
  text({
    name: "mqtt-broker",
    field: "mqttBroker",
    group: "MQTT",
    help: "Broker host, the original script's form (with --mqtt-port); --mqtt-url wins",
  }),
  int({
    name: "mqtt-port",
    field: "mqttPort",
    default: 1883,
    min: 1,
    max: 65535,
    group: "MQTT",
    help: "Broker port for --mqtt-broker",
  }),
  text({
    name: "mqtt-client-id",
    field: "mqttClientId",
    default: "vllm-mqtt",
    group: "MQTT",
    help: "MQTT client id; keep it stable so the broker keeps the session across reconnects",
  }),
  transform(
    text({
      name: "share-group",
      field: "shareGroup",
      group: "MQTT",
      help:
        "Shared-subscription group: instances in one group split the requests ($share/NAME/...); give each its own --mqtt-client-id",
    }),
    matching("share-group", /^[^/+#\s]+$/, "one topic level without / + # or spaces"),
  ),
  duration({
    name: "order-window",
    field: "orderWindowMs",
    unit: "ms",
    default: "50ms",
    min: "0",
    group: "MQTT",
    help:
      "With --share-group: how long a turn waits from its arrival for an earlier turn of its session, sent to another instance, to show up (0: arrival order as stored)",
  }),
  duration({
    name: "instance-timeout",
    field: "instanceTimeoutMs",
    unit: "s",
    default: "10s",
    min: "1s",
    group: "MQTT",
    help:
      "With --share-group: time without a heartbeat after which an instance counts as gone, so the turns it held stop holding up their sessions",
  }),
  text({
    name: "mqtt-username",
    field: "mqttUsername",
    group: "MQTT",
    help: "Broker user name",
  }),
  text({
    name: "mqtt-password",
    field: "mqttPassword",
    secret: true,
    group: "MQTT",
    help: "Broker password (prefer the environment variable or --mqtt-password-file)",
  }),
  text({
    name: "mqtt-password-file",
    field: "mqttPasswordFile",
    group: "MQTT",
    help: "File holding the broker password",
  }),
  transform(
    choice({
      name: "mqtt-version",
      field: "mqttVersion",
      default: "auto",
      choices: ["auto", "5", "4"],
      group: "MQTT",
      help:
        "MQTT protocol: 5, 4 for 3.1.1, or auto: 5, else 3.1.1 when the broker refuses 5 (the embedded broker always uses 4)",
    }),
    (version) => version === "auto" ? version : Number(version) as 4 | 5,
  ),
  size({
    name: "mqtt-max-packet-bytes",
    field: "mqttMaxPacketBytes",
    default: "0",
    group: "MQTT",
    help:
      "Largest packet the broker takes (0: what an MQTT 5 broker says, else no limit); set it to a 3.1.1 broker's limit, or to mosquitto's message_size_limit. A longer answer is split into deltas",
  }),
  choice({
    name: "broker-profile",
    field: "brokerProfile",
    default: "standard",
    choices: BROKER_PROFILES,
    group: "MQTT",
    help:
      "The broker's topic rules: standard (MQTT's), or nats (no '.' or ' ' in a topic: such session ids are refused)",
  }),
  transform(
    int({
      name: "qos",
      field: "qos",
      default: 1,
      min: 0,
      max: 2,
      group: "MQTT",
      help: "QoS of subscriptions and replies",
    }),
    (qos) => qos as 0 | 1 | 2,
  ),
  transform(
    text({
      name: "topic-prefix",
      field: "topicPrefix",
      default: "",
      group: "MQTT",
      help: "Prefix of every topic, e.g. site1/ (then site1/maze/user_input)",
    }),
    matching("topic-prefix", /^[^+#\0]*$/, "free of + # and NUL"),
  ),
  text({
    name: "service-name",
    field: "serviceName",
    default: "vllm-mqtt",
    group: "MQTT",
    help: "Topic root of the retained {service}/status and the {service}/stats messages",
  }),
  text({
    name: "tls-ca",
    field: "tlsCa",
    group: "MQTT",
    help: "CA certificate file for mqtts://",
  }),
  text({
    name: "tls-cert",
    field: "tlsCert",
    group: "MQTT",
    help: "Client certificate file for mqtts://",
  }),
  text({
    name: "tls-key",
    field: "tlsKey",
    group: "MQTT",
    help: "Client key file for mqtts://",
  }),

  // Scheduling
  int({
    name: "workers",
    field: "workers",
    // A default past the maximum would stop start-up on a large machine.
    default: Math.min(CORES, 64),
    min: 0,
    max: 64,
    aliases: ["num-workers"],
    group: "Scheduling",
    help:
      "Web Workers running turns (many each); 0 runs turns on the MQTT thread: less CPU, but tokenizing holds MQTT up",
  }),
  int({
    name: "max-in-flight",
    field: "maxInFlight",
    default: 256,
    min: 1,
    group: "Scheduling",
    help: "Requests sent to the engine at once (vLLM's --max-num-seqs)",
  }),
  int({
    name: "max-queue",
    field: "maxQueue",
    default: 1000,
    min: 1,
    group: "Scheduling",
    help: "Requests waiting for the engine before new ones get `queue_full`",
  }),
  int({
    name: "max-priority",
    field: "maxPriority",
    default: 10,
    min: 0,
    group: "Scheduling",
    help: "Request priorities are clamped to [-max, max]; lower is served sooner",
  }),
  size({
    name: "max-payload-bytes",
    field: "maxPayloadBytes",
    default: "8MiB",
    min: "256B",
    group: "Scheduling",
    help:
      "Largest request payload; larger ones get `payload_too_large` before parsing (room for --max-images images and --max-audio-clips clips)",
  }),
  size({
    name: "payload-memory",
    field: "payloadMemory",
    default: "256MiB",
    min: "0",
    group: "Scheduling",
    help:
      "Heap the requests in flight may hold (payloads being parsed, requests queued or running, by their size and shape); one that does not fit gets `overloaded`; 0 turns it off",
  }),
  int({
    name: "max-message-chars",
    field: "maxMessageChars",
    default: 16000,
    min: 1,
    group: "Scheduling",
    help: "Longest user message",
  }),
  int({
    name: "max-images",
    field: "maxImages",
    default: 4,
    min: 0,
    max: 64,
    group: "Scheduling",
    help: "Images a request may carry (`images`); 0 takes none",
  }),
  size({
    name: "max-image-bytes",
    field: "maxImageBytes",
    default: "1MiB",
    min: "1KiB",
    group: "Scheduling",
    help: "Largest image, decoded (a PNG, JPEG, WebP or GIF)",
  }),
  flag({
    name: "remote-images",
    field: "remoteImages",
    default: false,
    group: "Scheduling",
    help:
      "Pass http(s) image URLs on for the engine to fetch (off: a client could make the GPU box fetch any address)",
  }),
  int({
    name: "max-audio-clips",
    field: "maxAudioClips",
    default: 0,
    min: 0,
    max: 16,
    group: "Scheduling",
    help:
      "Audio clips a request may carry (`audio`); 0 takes none; not given, 1 with --audio-model",
  }),
  size({
    name: "max-audio-bytes",
    field: "maxAudioBytes",
    default: "1MiB",
    min: "1KiB",
    group: "Scheduling",
    help: "Largest audio clip, decoded (a WAV, MP3, FLAC or Ogg Opus/Vorbis)",
  }),
  duration({
    name: "max-audio-duration",
    field: "maxAudioMs",
    unit: "s",
    default: "30s",
    min: "1s",
    max: "1h",
    group: "Scheduling",
    help:
      "Longest audio a request may carry, its clips together (Whisper-based audio models hear 30 s windows)",
  }),
  duration({
    name: "dedup-window",
    field: "dedupWindowMs",
    unit: "s",
    default: "10m",
    min: "0",
    group: "Scheduling",
    help: "How long a request_id is remembered: a repeat is answered again, not generated twice",
  }),
  num({
    name: "rate-limit",
    field: "rateLimit",
    default: 60,
    min: 0,
    group: "Scheduling",
    help:
      "Requests per minute per session, after a burst of --rate-limit-burst (and, apart, feedback messages per minute per session); 0 turns it off",
  }),
  num({
    name: "rate-limit-client",
    field: "rateLimitClient",
    default: 0,
    min: 0,
    group: "Scheduling",
    help:
      "Requests per minute per client id (the request's clientId/client_id); 0 (default) turns it off: a backend relays many users under one id",
  }),
  int({
    name: "rate-limit-new-sessions",
    field: "rateLimitNewSessions",
    default: 60,
    min: 0,
    group: "Scheduling",
    help:
      "With --session-secret: sessions a project may start per minute, after a burst of as many: a signed id issued on new_session, or the first request of a signed id not seen (hoarded), so that rotating ids gains nothing on --rate-limit; 0 turns it off",
  }),
  int({
    name: "rate-limit-burst",
    field: "rateLimitBurst",
    default: 20,
    min: 1,
    group: "Scheduling",
    help:
      "Requests a session (or ten times as many, a client) may send at once (20: the original's 20 a minute)",
  }),

  // Sessions
  text({
    name: "data-dir",
    field: "dataDir",
    default: "./data",
    group: "Sessions",
    help: "Where the session store (sessions.kv) lives",
  }),
  transform(
    text({
      name: "kv-url",
      field: "kvUrl",
      group: "Sessions",
      help:
        "A remote session store instead (a denokv server's URL; its token in DENO_KV_ACCESS_TOKEN), shared by instances on several hosts",
    }),
    matching("kv-url", /^https?:\/\/[^/]/, "an http(s) URL of a KV Connect server"),
  ),
  duration({
    name: "session-ttl",
    field: "sessionTtlMs",
    unit: "s",
    default: "1h",
    min: "1s",
    group: "Sessions",
    help: "Inactivity after which a session's history is forgotten",
  }),
  int({
    name: "max-sessions",
    field: "maxSessions",
    default: 100000,
    min: 1,
    aliases: ["max-concurrent-sessions"],
    group: "Sessions",
    help: "Live sessions kept; beyond it the least recently used is evicted",
  }),
  int({
    name: "max-history-tokens",
    field: "maxHistoryTokens",
    default: 3000,
    min: 1,
    group: "Sessions",
    help: "Token budget of a session's history (also bounded by --max-model-len)",
  }),
  num({
    name: "trim-low-water",
    field: "trimLowWater",
    default: 0.6,
    min: 0.1,
    max: 1,
    group: "Sessions",
    help:
      "Over budget, drop oldest turns down to this share of it in one go, so the next turns reuse vLLM's prefix cache (1: drop just enough)",
  }),

  // Generation defaults
  int({
    name: "max-tokens",
    field: "maxTokens",
    default: 512,
    min: 1,
    group: "Generation",
    help:
      "Default max_tokens per answer; a request may ask for more, up to what its prompt leaves of --max-model-len",
  }),
  int({
    name: "max-tokens-cap",
    field: "maxTokensCap",
    default: 0,
    min: 0,
    group: "Generation",
    help: "Upper bound of a request's max_tokens; 0: none but the model's context",
  }),
  num({
    name: "temperature",
    field: "temperature",
    default: 0.6,
    min: 0,
    max: 2,
    group: "Generation",
    help: "Default sampling temperature",
  }),
  num({
    name: "top-p",
    field: "topP",
    default: 0.9,
    min: 0,
    max: 1,
    group: "Generation",
    help: "Default nucleus sampling top_p",
  }),
  flag({
    name: "stream",
    field: "stream",
    default: true,
    group: "Generation",
    help: "Stream deltas to v1 clients unless a request says otherwise",
  }),

  // Operation
  duration({
    name: "stats-interval",
    field: "statsIntervalMs",
    unit: "s",
    default: "1m",
    min: "100ms",
    group: "Operation",
    help: "Time between statistics reports (log line and {service}/stats)",
  }),
  duration({
    name: "shutdown-timeout",
    field: "shutdownTimeoutMs",
    unit: "s",
    default: "30s",
    min: "0",
    group: "Operation",
    help: "How long in-flight requests may take to finish on SIGTERM before they are cancelled",
  }),
  int({
    name: "http-port",
    field: "httpPort",
    default: 8081,
    min: 0,
    max: 65535,
    group: "Operation",
    help: "Port of /healthz, /readyz, /metrics and /status; 0 turns the HTTP endpoint off",
  }),
  text({
    name: "http-host",
    field: "httpHost",
    default: "127.0.0.1",
    group: "Operation",
    help: "Address the HTTP endpoint listens on; 0.0.0.0 exposes it to the network",
  }),
  list({
    name: "http-allowed-hosts",
    field: "httpAllowedHosts",
    default: [],
    group: "Operation",
    help:
      "Host names the HTTP endpoint answers to beside localhost, IP addresses and --http-host (e.g. the name Prometheus scrapes it by; .example.com: every subdomain); any other Host is refused 403, as DNS rebinding would send",
  }),
  flag({
    name: "dashboard",
    field: "dashboard",
    default: true,
    group: "Operation",
    help: "Serve the live page for the operator at / on the HTTP endpoint",
  }),
  transform(
    text({
      name: "dashboard-token",
      field: "dashboardToken",
      secret: true,
      group: "Operation",
      help: 'Bearer token the live page and "try it" need; best set in the environment',
    }),
    longSecret("dashboard-token"),
  ),
  flag({
    name: "dashboard-try-it",
    field: "dashboardTryIt",
    default: true,
    group: "Operation",
    help: 'Serve the live page\'s "try it" panel (sends a message as an MQTT request would)',
  }),

  choice({
    name: "log-level",
    field: "logLevel",
    default: "info",
    choices: ["debug", "info", "warning", "error"],
    group: "Operation",
    help: "Least severe level logged",
  }),
  flag({
    name: "enable-debug-logging",
    field: "enableDebugLogging",
    default: false,
    group: "Operation",
    help: "The original script's switch: the same as --log-level debug",
  }),
  choice({
    name: "log-format",
    field: "logFormat",
    default: "text",
    choices: ["text", "json"],
    group: "Operation",
    help: "Log lines as text or as JSON objects",
  }),

  // Experiments (A/B tests: a project's `variants`)
  duration({
    name: "outcome-retention",
    field: "outcomeRetentionMs",
    unit: "s",
    default: "720h",
    min: "1m",
    group: "Experiments",
    help:
      "How long each turn's outcome in an experiment is kept in the store, for `deno task ab-report` and the live page (720h: 30 days)",
  }),
  flag({
    name: "guardrail",
    field: "guardrail",
    default: false,
    group: "Experiments",
    help:
      "Stop a variant automatically when its error rate or time to first delta is shown worse than the baseline's beyond the margins (a one-sided test at 95%), and say so in the log, on the status topic and on the live page",
  }),
  num({
    name: "guardrail-error-margin",
    field: "guardrailErrorMargin",
    default: 0.05,
    min: 0,
    max: 1,
    group: "Experiments",
    help:
      "Guardrail: how much higher than the baseline's a variant's error rate may be (0.05: 5 points)",
  }),
  num({
    name: "guardrail-ttfd-margin",
    field: "guardrailTtfdMargin",
    default: 0.5,
    min: 0,
    group: "Experiments",
    help:
      "Guardrail: how much slower than the baseline's a variant's mean time to first delta may be, as a share of it (0.5: half again)",
  }),
  int({
    name: "guardrail-min-sessions",
    field: "guardrailMinSessions",
    default: 20,
    min: 2,
    group: "Experiments",
    help: "Guardrail: sessions the baseline and a variant each need before the variant is judged",
  }),
  duration({
    name: "guardrail-interval",
    field: "guardrailIntervalMs",
    unit: "s",
    default: "30s",
    min: "100ms",
    group: "Experiments",
    help: "Guardrail: time between checks",
  }),
] as const satisfies readonly OptionSpec[];
