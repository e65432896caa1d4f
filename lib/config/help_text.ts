/**
 * The `--help` text, generated from the option table so that it lists every
 * option with its default, in the units a user would write it.
 *
 * @module
 */

import denoConfig from "../../deno.json" with { type: "json" };
import { defaultText } from "./option_spec.ts";
import { OPTIONS, type OptionSpec } from "./options.ts";

/** The `--version` line: the program's version (deno.json's) and the Deno that runs it. */
export function versionText(): string {
  return `vllm-mqtt ${denoConfig.version} (deno ${Deno.version.deno}, protocol v1)`;
}

/** What `<...>` after a flag calls its value. */
const VALUE_NAMES: Readonly<Record<OptionSpec["kind"], string>> = {
  string: "string",
  int: "int",
  number: "number",
  boolean: "",
  list: "list",
  duration: "duration",
  size: "size",
};

/** The `--help` text, generated from the option table. */
export function helpText(): string {
  const lines = [
    "vllm-mqtt: serve a large language model to MQTT clients",
    "",
    "Usage: deno task start [OPTIONS]      (--help: this text; --version: the version)",
    "",
    "Every option also reads VLLM_MQTT_<NAME> from the environment (NAME in upper snake case).",
    "Underscores may replace dashes (--max_model_len). Booleans: --flag, --no-flag, --flag=false.",
    "Durations take a unit: 250ms, 30s, 5m, 2h (a bare number: the unit shown with the option).",
    "Sizes take a unit: 512B, 64KiB, 6MiB, 1GiB (a bare number is in bytes).",
  ];
  let group = "";
  for (const option of OPTIONS as readonly OptionSpec[]) {
    if (option.group !== group) {
      group = option.group;
      lines.push("", `${group}:`);
    }
    const kind = VALUE_NAMES[option.kind];
    const placeholder = kind === "" ? "" : ` <${kind}>`;
    const aliases = option.aliases?.length
      ? ` (also ${option.aliases.map((a) => `--${a}`).join(", ")})`
      : "";
    const notes: string[] = [];
    if (option.choices) notes.push(`one of: ${option.choices.join(", ")}`);
    const shown = defaultText(option);
    if (shown) notes.push(`default: ${shown}`);
    if (option.unit !== undefined) {
      notes.push(`a bare number is in ${option.unit === "s" ? "seconds" : "milliseconds"}`);
    }
    const note = notes.length > 0 ? ` [${notes.join("; ")}]` : "";
    lines.push(`  --${option.name}${placeholder}${aliases}`, `      ${option.help}${note}`);
  }
  return lines.join("\n");
}
