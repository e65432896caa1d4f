/**
 * The one error start-up configuration fails with, so that `main.ts` can tell
 * an operator's mistake (exit code 2, the message alone) from a bug.
 *
 * @module
 */

/** What is wrong, for callers that act on the kind of mistake rather than on the message. */
export type ConfigErrorCode =
  /** An option's value cannot be read or is out of range: `option` and `value` say which. */
  | "bad_value"
  /** A flag the program does not know: `option` names it. */
  | "unknown_option"
  /** A flag given last, without its value: `option` names it. */
  | "missing_value"
  /** A command-line word that is not a flag: `value` holds it. */
  | "unexpected_argument"
  /** Options that are fine alone but not together: `option` names the one to change. */
  | "conflict"
  /** A file named by an option cannot be read: `option` names it. */
  | "unreadable_file"
  /** Anything else (a project file's front matter, a folder that is missing). */
  | "invalid";

/** Raised when the command line, the environment or a file it names holds a bad value. */
export class ConfigError extends Error {
  /** The kind of mistake. @default {"invalid"} */
  readonly code: ConfigErrorCode;
  /** The option at fault, without its dashes (`max-tokens`), when there is one. */
  readonly option: string | undefined;
  /** The value at fault, as given, when there is one (never a secret's). */
  readonly value: string | undefined;

  constructor(
    message: string,
    details: { code?: ConfigErrorCode; option?: string; value?: string } = {},
  ) {
    super(message);
    this.name = "ConfigError";
    this.code = details.code ?? "invalid";
    this.option = details.option;
    this.value = details.value;
  }
}

/** The usual error of a value: `'--name' must be WHAT: current value is "RAW"`. */
export function badValue(option: string, what: string, raw: string): ConfigError {
  return new ConfigError(`'--${option}' must be ${what}: current value is ${JSON.stringify(raw)}`, {
    code: "bad_value",
    option,
    value: raw,
  });
}
