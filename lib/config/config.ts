/**
 * Start-up configuration: the command line and the environment, parsed once
 * into a typed, frozen {@linkcode Config}. A bad value stops start-up with a
 * {@linkcode ConfigError} naming the option.
 *
 * Each option fills the field its entry in the option table names, with the
 * type its constructor gives; {@linkcode Config} is derived from the table.
 * What this module adds is what spans options: the original scripts' forms
 * (`--server_url`, `--mqtt_broker` with `--mqtt_port`, `--enable_debug_logging`),
 * the password file, and the limits that must agree with each other.
 *
 * @module
 */

import { payloadRoomForAudio } from "../protocol/audio.ts";
import { payloadRoomForImages, TEXT_PAYLOAD_ROOM } from "../protocol/images.ts";
import { badValue, ConfigError } from "./config_error.ts";
import { defaultText } from "./option_spec.ts";
import { OPTIONS, type OptionSpec } from "./options.ts";
import { type Args, optionText, readArgs } from "./read_args.ts";

export { ConfigError, type ConfigErrorCode } from "./config_error.ts";
export { helpText, versionText } from "./help_text.ts";
export type { LoraModule } from "./options.ts";

/** The value of every option, by the field its table entry names. */
export type OptionValues = {
  readonly [O in (typeof OPTIONS)[number] as O["field"]]: O extends OptionSpec<string, infer T> ? T
    : never;
};

/** Options read only to build other fields (the original scripts' forms). */
type InputOnly = "serverUrl" | "mqttBroker" | "mqttPort" | "enableDebugLogging";

/**
 * The program's whole configuration, validated: every option's field (see the
 * option table for what each means; durations in milliseconds, sizes in bytes),
 * less the original scripts' forms, which fill `engine`, `engineUrl`, `mqttUrl`
 * and `logLevel`.
 */
export type Config = Readonly<
  Omit<OptionValues, InputOnly | "servedModelName"> & {
    /** The name the engine serves the model under: `--served-model-name`, else `--model`. */
    servedModelName: string;
    /**
     * `--engine-url` read as its list of URLs (several engines, comma-separated), each without
     * its trailing slash; `engineUrl` is the first.
     * @default {[]}
     */
    engineUrls: readonly string[];
    /**
     * `--visible-devices` split into its GPU groups (`;`): one managed vLLM each. Empty when
     * not given (one vLLM, CUDA_VISIBLE_DEVICES untouched).
     * @default {[]}
     */
    gpuGroups: readonly string[];
    /** Warnings found while parsing (a secret on the command line); logged once logging is up. */
    warnings: readonly string[];
  }
>;

/** Which engine answers the requests. */
export type EngineMode = Config["engine"];

/** What {@linkcode parseConfig} returns: a configuration, or a request for help or the version. */
export type ParseResult =
  /** Information instead of a run: the `--help` text, or the `--version` line. */
  | { help: true; show: "help" | "version" }
  | { help: false; config: Config };

/** Every option's value (given, from the environment, or its default), and which were given. */
function readValues(
  args: Args,
  env: Readonly<Record<string, string | undefined>>,
): { values: OptionValues; given: ReadonlySet<string> } {
  const values: Record<string, unknown> = {};
  const given = new Set<string>();
  for (const option of OPTIONS as readonly OptionSpec[]) {
    const text = optionText(option, args, env);
    if (text !== undefined) given.add(option.name);
    const raw = text ?? defaultText(option);
    values[option.field] = raw === undefined ? undefined : option.parse(raw);
  }
  // The table's constructors type each field by the value its reader returns.
  return { values: values as OptionValues, given };
}

function conflict(option: string, message: string): ConfigError {
  return new ConfigError(message, { code: "conflict", option });
}

const MQTT_SCHEMES = ["mqtt:", "mqtts:", "ws:", "wss:", "tcp:", "ssl:"];

/**
 * Parses the command line and the environment into a frozen {@linkcode Config}.
 *
 * @param argv The arguments after the program name.
 * @param env The environment to read `VLLM_MQTT_*` fallbacks from.
 * @param readTextFile Reads `--mqtt-password-file` (a stand-in in tests).
 * @throws {ConfigError} When a value is missing, unknown or out of range.
 */
export function parseConfig(
  argv: readonly string[],
  env: Readonly<Record<string, string | undefined>>,
  readTextFile: (path: string) => string = Deno.readTextFileSync,
): ParseResult {
  const args = readArgs(argv);
  if (args.help) return { help: true, show: "help" };
  if (args.version) return { help: true, show: "version" };
  const { values, given } = readValues(args, env);
  const { serverUrl, mqttBroker, mqttPort, enableDebugLogging, ...options } = values;

  // The original llama.cpp script's `--server_url`: attach to that server.
  const engine = serverUrl !== undefined && !given.has("engine") ? "url" : options.engine;
  const engineUrl = options.engineUrl ?? serverUrl;
  if (engine === "url" && !engineUrl) {
    throw new ConfigError("'--engine url' needs '--engine-url', e.g. http://gpu-box:8000/v1", {
      code: "missing_value",
      option: "engine-url",
    });
  }
  const engineUrls = (engineUrl ?? "").split(",").map((url) => url.trim().replace(/\/+$/, ""))
    .filter((url) => url !== "");
  for (const url of engineUrls) {
    if (!URL.canParse(url)) {
      throw badValue("engine-url", "a URL (or URLs separated by commas)", url);
    }
  }
  const gpuGroups = gpuGroupsOf(options.visibleDevices, options.pipelineParallelSize);

  // The original script's `--mqtt_broker HOST --mqtt_port PORT`.
  let mqttUrl = options.mqttUrl;
  if (!mqttUrl && mqttBroker) {
    mqttUrl = mqttBroker.includes("://") ? mqttBroker : `mqtt://${mqttBroker}:${mqttPort}`;
  }
  if (mqttUrl !== undefined) {
    const parsed = URL.canParse(mqttUrl) ? new URL(mqttUrl) : undefined;
    if (!parsed || !MQTT_SCHEMES.includes(parsed.protocol)) {
      throw badValue("mqtt-url", "an mqtt://, mqtts://, ws:// or wss:// URL", mqttUrl);
    }
  }

  let mqttPassword = options.mqttPassword;
  if (!mqttPassword && options.mqttPasswordFile) {
    try {
      mqttPassword = readTextFile(options.mqttPasswordFile).trim();
    } catch (error) {
      // Without read access, the start-up's permission check names the command that grants it.
      if (!(error instanceof Deno.errors.NotCapable)) {
        throw new ConfigError(
          `'--mqtt-password-file' could not be read: ${(error as Error).message}`,
          { code: "unreadable_file", option: "mqtt-password-file" },
        );
      }
    }
  }

  const config: Config = {
    ...options,
    engine,
    engineUrl: engineUrls[0],
    engineUrls: Object.freeze(engineUrls),
    gpuGroups,
    mqttUrl,
    mqttPassword,
    servedModelName: options.servedModelName ?? options.model,
    // The original script's `--enable_debug_logging` asks for what `--log-level debug` does.
    logLevel: enableDebugLogging && !given.has("log-level") ? "debug" : options.logLevel,
    // Audio is taken where a model hears it: an audio model takes a clip unless told otherwise.
    maxAudioClips: options.audioModel && !given.has("max-audio-clips") ? 1 : options.maxAudioClips,
    warnings: Object.freeze([...args.warnings]),
  };
  checkLimits(config);
  return { help: false, config: Object.freeze(config) };
}

/**
 * The GPU groups of `--visible-devices` ("0,1;2,3": one vLLM on 0,1 and one on 2,3). Each group
 * of several is split by tensor parallelism over what pipeline parallelism leaves, so its
 * GPUs must divide evenly.
 */
function gpuGroupsOf(devices: string | undefined, pipeline: number): readonly string[] {
  if (devices === undefined) return Object.freeze([]);
  const groups = devices.split(";").map((group) => group.trim());
  if (groups.some((group) => group === "")) {
    throw badValue("visible-devices", "GPU ids, with groups separated by ';' (0,1;2,3)", devices);
  }
  for (const group of groups) {
    if (groups.length > 1 && group.split(",").length % pipeline !== 0) {
      throw conflict(
        "visible-devices",
        `'--visible-devices' group ${group} has ${group.split(",").length} GPUs, which ` +
          `'--pipeline-parallel-size' ${pipeline} does not divide`,
      );
    }
  }
  return Object.freeze(groups);
}

/** Limits that are fine alone but must agree with each other. */
function checkLimits(config: Config): void {
  // A payload limit smaller than what the image limits allow would refuse allowed images whole.
  const imageRoom = payloadRoomForImages(config.maxImages, config.maxImageBytes);
  if (config.maxPayloadBytes < imageRoom) {
    throw conflict(
      "max-payload-bytes",
      `'--max-payload-bytes' (${config.maxPayloadBytes}) is too small for what '--max-images' ` +
        `(${config.maxImages}) and '--max-image-bytes' (${config.maxImageBytes}) allow: that many ` +
        `images as base64 with the message take up to ${imageRoom} bytes; raise ` +
        `'--max-payload-bytes' to at least ${imageRoom}, lower the image limits, or take no ` +
        `images with '--max-images 0'`,
    );
  }
  // vLLM refuses top_p 0 in every request ("top_p must be in (0, 1]").
  if (config.topP <= 0) {
    throw conflict("top-p", "'--top-p' must be above 0 (vLLM takes 0 < top_p <= 1): it is 0");
  }
  // Images and audio may come in one request: the payload must hold both at their limits.
  const mediaRoom = payloadRoomForImages(config.maxImages, config.maxImageBytes) +
    payloadRoomForAudio(config.maxAudioClips, config.maxAudioBytes) +
    (config.maxImages === 0 ? TEXT_PAYLOAD_ROOM : 0);
  if (config.maxAudioClips > 0 && config.maxPayloadBytes < mediaRoom) {
    throw conflict(
      "max-payload-bytes",
      `'--max-payload-bytes' (${config.maxPayloadBytes}) is too small for what '--max-audio-clips' ` +
        `(${config.maxAudioClips}) and '--max-audio-bytes' (${config.maxAudioBytes}) allow beside ` +
        `the images: that much audio and images as base64 with the message take up to ` +
        `${mediaRoom} bytes; raise '--max-payload-bytes' to at least ${mediaRoom}, lower the ` +
        `audio or image limits, or take no audio with '--max-audio-clips 0'`,
    );
  }
  if (config.audioModel && config.maxAudioClips === 0) {
    throw conflict(
      "max-audio-clips",
      "'--audio-model' needs '--max-audio-clips' above 0 (1 when not given): it is 0",
    );
  }
  // A payload within --max-payload-bytes must fit the budget alone, or it is never taken.
  if (config.payloadMemory > 0 && config.payloadMemory < 4 * config.maxPayloadBytes) {
    throw conflict(
      "payload-memory",
      `'--payload-memory' (${config.payloadMemory}) must be 0 or at least 4 times ` +
        `'--max-payload-bytes' (${config.maxPayloadBytes}), the memory one payload of that size ` +
        `takes while it is parsed: raise it to at least ${4 * config.maxPayloadBytes}`,
    );
  }
  if (config.visionModel && config.maxImages === 0) {
    throw conflict("max-images", "'--vision-model' needs '--max-images' above 0: it is 0");
  }
  if (config.maxTokens >= config.maxModelLen) {
    throw conflict(
      "max-tokens",
      `'--max-tokens' must be below '--max-model-len' (${config.maxModelLen}): current value is ${config.maxTokens}`,
    );
  }
  if (config.maxTokensCap > 0 && config.maxTokensCap < config.maxTokens) {
    throw conflict(
      "max-tokens-cap",
      `'--max-tokens-cap' must be at least '--max-tokens' (${config.maxTokens}), or 0 for none: current value is ${config.maxTokensCap}`,
    );
  }
}
