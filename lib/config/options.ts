/**
 * Every command-line option the program takes, in one table. `--help`, the
 * environment fallbacks (`VLLM_MQTT_` + the name in upper snake case) and the
 * option list in docs/options.md are all generated from or checked against it.
 *
 * @module
 */

/** The kinds of value an option holds. */
export type OptionKind = "string" | "int" | "number" | "boolean" | "list";

/** One option: its name on the command line, its kind, default and help text. */
export interface OptionSpec {
  /** The flag without its dashes, in kebab case (`max-model-len`). */
  readonly name: string;
  readonly kind: OptionKind;
  /** The value when neither the flag nor its environment variable is given. */
  readonly default?: string | number | boolean | readonly string[];
  /** Smallest accepted value, for `int` and `number`. */
  readonly min?: number;
  /** Largest accepted value, for `int` and `number`. */
  readonly max?: number;
  /** The accepted values, for `string`. */
  readonly choices?: readonly string[];
  /** Other names the flag answers to (the original Python script's names). */
  readonly aliases?: readonly string[];
  /** A secret: never logged, and a warning when given on the command line. */
  readonly secret?: boolean;
  readonly help: string;
  /** The section of `--help` it is listed under. */
  readonly group: string;
}

const CORES = navigator.hardwareConcurrency ?? 2;

/** The option table. Order is the order of `--help`. */
export const OPTIONS: readonly OptionSpec[] = [
  // Projects and prompts
  {
    name: "projects",
    kind: "list",
    default: ["general"],
    group: "Projects",
    help: "Projects to serve, comma- or space-separated; each needs prompts/NAME.md",
  },
  {
    name: "prompts-dir",
    kind: "string",
    default: "prompts",
    group: "Projects",
    help: "Folder holding one system prompt per project (NAME.md)",
  },
  {
    name: "answer-unknown-projects",
    kind: "boolean",
    default: false,
    group: "Projects",
    help:
      "Also subscribe +/user_input and answer `unknown_project` for projects not served (off: several services may share a broker, each with its projects)",
  },
  {
    name: "session-topics-only",
    kind: "boolean",
    default: false,
    group: "Projects",
    help:
      "Take requests only on each session's own topic, {project}/user_input/{session_id}, which a broker ACL can grant to that session's user alone; the shared {project}/user_input answers `forbidden`",
  },
  {
    name: "session-secret",
    kind: "string",
    secret: true,
    group: "Projects",
    help:
      "With a secret (16+ characters), only signed session ids ({name}.{signature}) are taken, and {project}/new_session/{nonce} hands out new ones (for brokers without per-user ACLs)",
  },
  {
    name: "control-topics",
    kind: "boolean",
    default: true,
    group: "Projects",
    help: "Serve {project}/clear_history, delete_session and template control topics",
  },

  // Engine
  {
    name: "engine",
    kind: "string",
    default: "vllm",
    choices: ["vllm", "url", "sim"],
    group: "Engine",
    help:
      "vllm: start and supervise `vllm serve`; url: attach to --engine-url; sim: simulated engine",
  },
  {
    name: "engine-url",
    kind: "string",
    group: "Engine",
    help: "OpenAI-compatible base URL for --engine url, e.g. http://gpu-box:8000/v1",
  },
  {
    name: "server-url",
    kind: "string",
    group: "Engine",
    help:
      "The original llama.cpp script's form: attach to this OpenAI-compatible server (--engine url --engine-url URL, unless those are given)",
  },
  {
    name: "engine-api-key",
    kind: "string",
    secret: true,
    group: "Engine",
    help: "API key for --engine url (prefer the environment variable)",
  },
  {
    name: "model",
    kind: "string",
    default: "Qwen/QwQ-32B",
    group: "Engine",
    help: "Model for vLLM to serve (and the model name sent to an attached engine)",
  },
  {
    name: "served-model-name",
    kind: "string",
    group: "Engine",
    help: "Name the engine serves the model under (default: --model)",
  },
  {
    name: "max-model-len",
    kind: "int",
    default: 4096,
    min: 256,
    group: "Engine",
    help: "Context length of the model, in tokens",
  },
  {
    name: "request-timeout",
    kind: "number",
    default: 120,
    min: 1,
    aliases: ["server-timeout"],
    group: "Engine",
    help: "Seconds one request may take in the engine before it is answered with `timeout`",
  },
  {
    name: "engine-retries",
    kind: "int",
    default: 2,
    min: 0,
    max: 10,
    group: "Engine",
    help: "Retries of a request the engine could not be reached for, before `engine_unavailable`",
  },
  {
    name: "engine-wait",
    kind: "number",
    default: 30,
    min: 0,
    group: "Engine",
    help:
      "Seconds a request waits for an engine that is down (restarting, unreachable) before `engine_unavailable`",
  },
  {
    name: "skip-thinking",
    kind: "boolean",
    default: true,
    group: "Engine",
    help:
      "Remove <think>...</think> reasoning from replies and history; ask the model not to think",
  },
  {
    name: "sim-ttft-ms",
    kind: "number",
    default: 50,
    min: 0,
    group: "Engine",
    help: "Simulated engine: time to first token",
  },
  {
    name: "sim-itl-ms",
    kind: "number",
    default: 15,
    min: 0,
    group: "Engine",
    help: "Simulated engine: time between tokens at batch size 1 (grows with the batch)",
  },

  // vLLM (managed mode)
  {
    name: "tensor-parallel-size",
    kind: "int",
    default: 1,
    min: 1,
    group: "vLLM",
    help: "vLLM --tensor-parallel-size",
  },
  {
    name: "gpu-memory-utilization",
    kind: "number",
    default: 0.9,
    min: 0.05,
    max: 1,
    group: "vLLM",
    help: "vLLM --gpu-memory-utilization",
  },
  {
    name: "quantization",
    kind: "string",
    group: "vLLM",
    help: "vLLM --quantization (awq, gptq, fp8, ...)",
  },
  {
    name: "pipeline-parallel-size",
    kind: "int",
    default: 1,
    min: 1,
    group: "vLLM",
    help: "vLLM --pipeline-parallel-size",
  },
  {
    name: "dtype",
    kind: "string",
    default: "auto",
    group: "vLLM",
    help: "vLLM --dtype (auto, bfloat16, float16, ...)",
  },
  {
    name: "trust-remote-code",
    kind: "boolean",
    default: false,
    group: "vLLM",
    help: "vLLM --trust-remote-code (runs the model repository's own code)",
  },
  {
    name: "enforce-eager",
    kind: "boolean",
    default: false,
    group: "vLLM",
    help: "vLLM --enforce-eager: no CUDA graphs (starts faster, runs slower)",
  },
  {
    name: "lora-modules",
    kind: "list",
    default: [],
    group: "vLLM",
    help:
      "LoRA adapters served beside the model, as NAME=PATH (comma- or space-separated; vLLM --enable-lora --lora-modules); a project file's `model:` names one",
  },
  {
    name: "vllm-args",
    kind: "string",
    default: "",
    group: "vLLM",
    help: "Further arguments for `vllm serve`, passed as given (split on spaces)",
  },
  {
    name: "vllm-startup-timeout",
    kind: "number",
    default: 900,
    min: 1,
    group: "vLLM",
    help: "Seconds vLLM may take to become healthy (large models compile for minutes)",
  },
  {
    name: "vllm-stop-grace",
    kind: "number",
    default: 10,
    min: 0,
    group: "vLLM",
    help: "Seconds between SIGTERM and SIGKILL when vLLM is stopped",
  },
  {
    name: "vllm-max-restarts",
    kind: "int",
    default: 5,
    min: 0,
    group: "vLLM",
    help: "Crashes within 10 minutes after which the program gives up and exits non-zero",
  },
  {
    name: "visible-devices",
    kind: "string",
    group: "vLLM",
    help: "GPUs vLLM may use (sets CUDA_VISIBLE_DEVICES), e.g. 2 or 0,1",
  },
  {
    name: "model-provider",
    kind: "string",
    default: "auto",
    choices: ["auto", "modelscope", "local", "huggingface"],
    group: "vLLM",
    help: "Where vLLM loads the model from; modelscope sets VLLM_USE_MODELSCOPE=True",
  },
  {
    name: "model-cache-dir",
    kind: "string",
    group: "vLLM",
    help: "Where vLLM downloads and keeps model weights (vLLM --download-dir)",
  },
  {
    name: "model-revision",
    kind: "string",
    group: "vLLM",
    help: "Model revision (branch, tag or commit) to load (vLLM --revision)",
  },
  {
    name: "auto-download",
    kind: "boolean",
    default: true,
    group: "vLLM",
    help:
      "Let vLLM download a model it does not have; false: only what is cached (sets HF_HUB_OFFLINE=1)",
  },
  {
    name: "vision-model",
    kind: "boolean",
    default: false,
    group: "vLLM",
    help: 'A VLM: vLLM gets --limit-mm-per-prompt {"image":N}, N = --max-images',
  },

  // MQTT
  {
    name: "mqtt-url",
    kind: "string",
    group: "MQTT",
    help:
      "Broker URL (mqtt://, mqtts://, ws://); absent: localhost:1883, or an embedded broker when nothing answers there",
  },
  {
    name: "embedded-broker-port",
    kind: "int",
    default: 1883,
    min: 0,
    max: 65535,
    group: "MQTT",
    help:
      "Without --mqtt-url: the localhost port probed for a broker, where the embedded one starts if none answers",
  },
  {
    name: "mqtt-broker",
    kind: "string",
    group: "MQTT",
    help: "Broker host, the original script's form (with --mqtt-port); --mqtt-url wins",
  },
  {
    name: "mqtt-port",
    kind: "int",
    default: 1883,
    min: 1,
    max: 65535,
    group: "MQTT",
    help: "Broker port for --mqtt-broker",
  },
  {
    name: "mqtt-client-id",
    kind: "string",
    default: "vllm-mqtt",
    group: "MQTT",
    help: "MQTT client id; keep it stable so the broker keeps the session across reconnects",
  },
  {
    name: "share-group",
    kind: "string",
    group: "MQTT",
    help:
      "Shared-subscription group: instances in one group split the requests ($share/NAME/...); give each its own --mqtt-client-id",
  },
  {
    name: "order-window",
    kind: "number",
    default: 50,
    min: 0,
    group: "MQTT",
    help:
      "With --share-group: milliseconds a turn waits from its arrival for an earlier turn of its session, sent to another instance, to show up (0: arrival order as stored)",
  },
  {
    name: "instance-timeout",
    kind: "number",
    default: 10,
    min: 1,
    group: "MQTT",
    help:
      "With --share-group: seconds without a heartbeat after which an instance counts as gone, so the turns it held stop holding up their sessions",
  },
  {
    name: "mqtt-username",
    kind: "string",
    group: "MQTT",
    help: "Broker user name",
  },
  {
    name: "mqtt-password",
    kind: "string",
    secret: true,
    group: "MQTT",
    help: "Broker password (prefer the environment variable or --mqtt-password-file)",
  },
  {
    name: "mqtt-password-file",
    kind: "string",
    group: "MQTT",
    help: "File holding the broker password",
  },
  {
    name: "mqtt-version",
    kind: "int",
    default: 5,
    choices: ["4", "5"],
    group: "MQTT",
    help: "MQTT protocol: 5, or 4 for 3.1.1 (the embedded broker always uses 4)",
  },
  {
    name: "qos",
    kind: "int",
    default: 1,
    min: 0,
    max: 2,
    group: "MQTT",
    help: "QoS of subscriptions and replies",
  },
  {
    name: "topic-prefix",
    kind: "string",
    default: "",
    group: "MQTT",
    help: "Prefix of every topic, e.g. site1/ (then site1/maze/user_input)",
  },
  {
    name: "service-name",
    kind: "string",
    default: "vllm-mqtt",
    group: "MQTT",
    help: "Topic root of the retained {service}/status and the {service}/stats messages",
  },
  {
    name: "tls-ca",
    kind: "string",
    group: "MQTT",
    help: "CA certificate file for mqtts://",
  },
  {
    name: "tls-cert",
    kind: "string",
    group: "MQTT",
    help: "Client certificate file for mqtts://",
  },
  {
    name: "tls-key",
    kind: "string",
    group: "MQTT",
    help: "Client key file for mqtts://",
  },

  // Scheduling
  {
    name: "workers",
    kind: "int",
    default: CORES,
    min: 1,
    max: 64,
    aliases: ["num-workers"],
    group: "Scheduling",
    help: "Web Workers doing session and engine work (each runs many requests at once)",
  },
  {
    name: "max-in-flight",
    kind: "int",
    default: 256,
    min: 1,
    group: "Scheduling",
    help: "Requests sent to the engine at once (vLLM's --max-num-seqs)",
  },
  {
    name: "max-queue",
    kind: "int",
    default: 1000,
    min: 1,
    group: "Scheduling",
    help: "Requests waiting for the engine before new ones get `queue_full`",
  },
  {
    name: "max-priority",
    kind: "int",
    default: 10,
    min: 0,
    group: "Scheduling",
    help: "Request priorities are clamped to [-max, max]; lower is served sooner",
  },
  {
    name: "max-payload-bytes",
    kind: "int",
    default: 6291456,
    min: 256,
    group: "Scheduling",
    help:
      "Largest request payload; larger ones get `payload_too_large` before parsing (room for --max-images images)",
  },
  {
    name: "max-message-chars",
    kind: "int",
    default: 16000,
    min: 1,
    group: "Scheduling",
    help: "Longest user message",
  },
  {
    name: "max-images",
    kind: "int",
    default: 4,
    min: 0,
    max: 64,
    group: "Scheduling",
    help: "Images a request may carry (`images`); 0 takes none",
  },
  {
    name: "max-image-bytes",
    kind: "int",
    default: 1048576,
    min: 1024,
    group: "Scheduling",
    help: "Largest image, decoded (a PNG, JPEG, WebP or GIF)",
  },
  {
    name: "remote-images",
    kind: "boolean",
    default: false,
    group: "Scheduling",
    help:
      "Pass http(s) image URLs on for the engine to fetch (off: a client could make the GPU box fetch any address)",
  },
  {
    name: "dedup-window",
    kind: "number",
    default: 600,
    min: 0,
    group: "Scheduling",
    help: "Seconds a request_id is remembered: a repeat is answered again, not generated twice",
  },
  {
    name: "rate-limit",
    kind: "number",
    default: 60,
    min: 0,
    group: "Scheduling",
    help: "Requests per minute per session, after a burst of --rate-limit-burst; 0 turns it off",
  },
  {
    name: "rate-limit-client",
    kind: "number",
    default: 0,
    min: 0,
    group: "Scheduling",
    help:
      "Requests per minute per client id (the request's clientId/client_id); 0 (default) turns it off: a backend relays many users under one id",
  },
  {
    name: "rate-limit-burst",
    kind: "int",
    default: 20,
    min: 1,
    group: "Scheduling",
    help:
      "Requests a session (or ten times as many, a client) may send at once (20: the original's 20 a minute)",
  },

  // Sessions
  {
    name: "data-dir",
    kind: "string",
    default: "./data",
    group: "Sessions",
    help: "Where the session store (sessions.kv) lives",
  },
  {
    name: "kv-url",
    kind: "string",
    group: "Sessions",
    help:
      "A remote session store instead (a denokv server's URL; its token in DENO_KV_ACCESS_TOKEN), shared by instances on several hosts",
  },
  {
    name: "session-ttl",
    kind: "number",
    default: 3600,
    min: 1,
    group: "Sessions",
    help: "Seconds of inactivity after which a session's history is forgotten",
  },
  {
    name: "max-sessions",
    kind: "int",
    default: 100000,
    min: 1,
    aliases: ["max-concurrent-sessions"],
    group: "Sessions",
    help: "Live sessions kept; beyond it the least recently used is evicted",
  },
  {
    name: "max-history-tokens",
    kind: "int",
    default: 3000,
    min: 1,
    group: "Sessions",
    help: "Token budget of a session's history (also bounded by --max-model-len)",
  },
  {
    name: "trim-low-water",
    kind: "number",
    default: 0.6,
    min: 0.1,
    max: 1,
    group: "Sessions",
    help:
      "Over budget, drop oldest turns down to this share of it in one go, so the next turns reuse vLLM's prefix cache (1: drop just enough)",
  },

  // Generation defaults
  {
    name: "max-tokens",
    kind: "int",
    default: 512,
    min: 1,
    group: "Generation",
    help:
      "Default max_tokens per answer; a request may ask for more, up to what its prompt leaves of --max-model-len",
  },
  {
    name: "max-tokens-cap",
    kind: "int",
    default: 0,
    min: 0,
    group: "Generation",
    help: "Upper bound of a request's max_tokens; 0: none but the model's context",
  },
  {
    name: "temperature",
    kind: "number",
    default: 0.6,
    min: 0,
    max: 2,
    group: "Generation",
    help: "Default sampling temperature",
  },
  {
    name: "top-p",
    kind: "number",
    default: 0.9,
    min: 0,
    max: 1,
    group: "Generation",
    help: "Default nucleus sampling top_p",
  },
  {
    name: "stream",
    kind: "boolean",
    default: true,
    group: "Generation",
    help: "Stream deltas to v1 clients unless a request says otherwise",
  },

  // Operation
  {
    name: "stats-interval",
    kind: "number",
    default: 60,
    min: 0.1,
    group: "Operation",
    help: "Seconds between statistics reports (log line and {service}/stats)",
  },
  {
    name: "shutdown-timeout",
    kind: "number",
    default: 30,
    min: 0,
    group: "Operation",
    help: "Seconds in-flight requests may take to finish on SIGTERM before they are cancelled",
  },
  {
    name: "http-port",
    kind: "int",
    default: 8081,
    min: 0,
    max: 65535,
    group: "Operation",
    help: "Port of /healthz, /readyz, /metrics and /status; 0 turns the HTTP endpoint off",
  },
  {
    name: "http-host",
    kind: "string",
    default: "127.0.0.1",
    group: "Operation",
    help: "Address the HTTP endpoint listens on; 0.0.0.0 exposes it to the network",
  },
  {
    name: "dashboard",
    kind: "boolean",
    default: true,
    group: "Operation",
    help: "Serve the live page for the operator at / on the HTTP endpoint",
  },
  {
    name: "dashboard-token",
    kind: "string",
    secret: true,
    group: "Operation",
    help: 'Bearer token the live page and "try it" need; best set in the environment',
  },
  {
    name: "dashboard-try-it",
    kind: "boolean",
    default: true,
    group: "Operation",
    help: 'Serve the live page\'s "try it" panel (sends a message as an MQTT request would)',
  },

  {
    name: "log-level",
    kind: "string",
    default: "info",
    choices: ["debug", "info", "warning", "error"],
    group: "Operation",
    help: "Least severe level logged",
  },
  {
    name: "enable-debug-logging",
    kind: "boolean",
    default: false,
    group: "Operation",
    help: "The original script's switch: the same as --log-level debug",
  },
  {
    name: "log-format",
    kind: "string",
    default: "text",
    choices: ["text", "json"],
    group: "Operation",
    help: "Log lines as text or as JSON objects",
  },
];

/** `max-model-len` → `VLLM_MQTT_MAX_MODEL_LEN`. */
export function envName(option: OptionSpec): string {
  return `VLLM_MQTT_${option.name.replaceAll("-", "_").toUpperCase()}`;
}
