/**
 * Reading the command line and the environment into the text of each option,
 * before any value is read from it.
 *
 * Flags are accepted as `--name value`, `--name=value`, with underscores in
 * place of dashes (`--max_model_len`, as the original Python script took them),
 * and booleans as `--flag`, `--no-flag`, `--flag=false` or `--flag False`. A
 * list's flag takes the bare words after it (`--projects maze driving`).
 *
 * @module
 */

import { ConfigError } from "./config_error.ts";
import { OPTIONS, type OptionSpec } from "./options.ts";
import { parseBoolean } from "./values.ts";
import { closest } from "../_util.ts";

/** Every option by its name and by each of its aliases. */
const BY_NAME: ReadonlyMap<string, OptionSpec> = new Map(
  OPTIONS.flatMap((option: OptionSpec) =>
    [option.name, ...(option.aliases ?? [])].map((name) => [name, option] as const)
  ),
);

/** `max-model-len` → `VLLM_MQTT_MAX_MODEL_LEN`. */
export function envName(name: string): string {
  return `VLLM_MQTT_${name.replaceAll("-", "_").toUpperCase()}`;
}

/** What the command line says, option by option, before the values are read. */
export interface Args {
  /** The text given for each option, by its name (not an alias). */
  readonly given: ReadonlyMap<string, string>;
  /** `--help` or `-h` was given. */
  readonly help: boolean;
  /** `--version` was given. */
  readonly version: boolean;
  /** Secrets given on the command line, where other users of the machine can see them. */
  readonly warnings: readonly string[];
}

/**
 * Reads `argv` into the text of each option given.
 *
 * @throws {ConfigError} For an unknown flag, a stray word, or a flag without its value.
 */
export function readArgs(argv: readonly string[]): Args {
  const given = new Map<string, string>();
  const warnings: string[] = [];
  let help = false;
  let version = false;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--help" || arg === "-h") {
      help = true;
      continue;
    }
    if (arg === "--version") {
      version = true;
      continue;
    }
    if (!arg.startsWith("--")) {
      throw new ConfigError(
        `unexpected argument ${JSON.stringify(arg)}: options start with --`,
        { code: "unexpected_argument", value: arg },
      );
    }
    const eq = arg.indexOf("=");
    let name = (eq === -1 ? arg.slice(2) : arg.slice(2, eq)).replaceAll("_", "-");
    let inline = eq === -1 ? undefined : arg.slice(eq + 1);
    let option = BY_NAME.get(name);
    if (!option && name.startsWith("no-") && BY_NAME.get(name.slice(3))?.kind === "boolean") {
      option = BY_NAME.get(name.slice(3))!;
      name = option.name;
      if (inline !== undefined) {
        throw new ConfigError(`'--${name}' negated takes no value`, {
          code: "bad_value",
          option: name,
          value: inline,
        });
      }
      inline = "false";
    }
    if (!option) {
      const meant = closest(name, BY_NAME.keys());
      const hint = meant === undefined ? "" : `did you mean '--${meant}'? `;
      throw new ConfigError(`unknown option '--${name}' (${hint}see --help)`, {
        code: "unknown_option",
        option: name,
      });
    }
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
        throw new ConfigError(`'--${option.name}' needs a value`, {
          code: "missing_value",
          option: option.name,
        });
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
          envName(option.name)
        } instead`,
      );
    }
    if (option.name === "mqtt-url" && urlPassword(raw)) {
      warnings.push(
        `'--mqtt-url' on the command line holds a password, visible to other users of this machine; use ${
          envName("mqtt-password")
        } or --mqtt-password-file instead`,
      );
    }
    given.set(option.name, raw);
  }
  return { given, help, version, warnings };
}

/**
 * The text of an option: the command line's, else its environment variable's
 * (an empty variable counts as unset), else undefined.
 */
export function optionText(
  option: OptionSpec,
  args: Args,
  env: Readonly<Record<string, string | undefined>>,
): string | undefined {
  const fromArgs = args.given.get(option.name);
  if (fromArgs !== undefined) return fromArgs;
  // A former name's variable still counts (VLLM_MQTT_SIM_TTFT_MS), after the current one's.
  for (const name of [option.name, ...(option.aliases ?? [])]) {
    const fromEnv = env[envName(name)];
    if (fromEnv !== undefined && fromEnv !== "") return fromEnv;
  }
  return undefined;
}

/** Whether a URL carries a password (`mqtt://user:secret@host`). */
function urlPassword(raw: string): boolean {
  try {
    return new URL(raw).password !== "";
  } catch {
    return false;
  }
}
