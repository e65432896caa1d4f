/**
 * What vLLM needs to be told about a model family: the tool-call parser that
 * reads its tool calls (`--tool-call-parser`, needed for `tool_choice: auto`)
 * and the reasoning parser that splits its thinking off the answer
 * (`--reasoning-parser`). The pairs are those vLLM's documentation gives
 * (docs/features/tool_calling.md, docs/features/reasoning_outputs.md); an
 * operator's `--tool-call-parser`/`--reasoning-parser` overrides them.
 *
 * Some reasoning models' chat templates open the thinking block in the prompt
 * (QwQ, DeepSeek-R1): what they generate is `reasoning...</think> answer`, with
 * no opening tag. vLLM's `deepseek_r1` parser takes everything before
 * `</think>` for reasoning; without it, the service's own filter must know
 * that the answer starts inside the block.
 *
 * @module
 */

/** A model family: how its name is recognised and what vLLM is started with for it. */
interface Family {
  readonly pattern: RegExp;
  readonly toolParser?: string;
  readonly reasoningParser?: string;
  /** The chat template opens the thinking block: answers start inside it. */
  readonly opensThinking?: boolean;
}

/** First match wins: the more specific names first. */
const FAMILIES: readonly Family[] = [
  { pattern: /qwq/i, toolParser: "hermes", reasoningParser: "deepseek_r1", opensThinking: true },
  { pattern: /deepseek-r1/i, reasoningParser: "deepseek_r1", opensThinking: true },
  { pattern: /qwen3/i, toolParser: "hermes", reasoningParser: "qwen3" },
  { pattern: /qwen2\.5|qwen2-/i, toolParser: "hermes" },
  { pattern: /hermes/i, toolParser: "hermes" },
  { pattern: /llama-?4/i, toolParser: "llama4_pythonic" },
  { pattern: /llama-?3/i, toolParser: "llama3_json" },
  { pattern: /mistral|mixtral|ministral/i, toolParser: "mistral" },
  { pattern: /granite/i, toolParser: "granite" },
  { pattern: /internlm/i, toolParser: "internlm" },
];

/** The families' defaults, for the documentation's table. */
export const MODEL_FAMILIES: readonly {
  readonly names: string;
  readonly toolParser?: string;
  readonly reasoningParser?: string;
}[] = FAMILIES.map((family) => ({
  names: family.pattern.source,
  toolParser: family.toolParser,
  reasoningParser: family.reasoningParser,
}));

function familyOf(model: string): Family | undefined {
  return FAMILIES.find((family) => family.pattern.test(model));
}

/**
 * The tool-call parser for `model`: `setting` unless it is `auto`, else the
 * family's; undefined for `none` or a family without one.
 */
export function toolParserFor(model: string, setting: string): string | undefined {
  if (setting === "none") return undefined;
  if (setting !== "auto") return setting;
  return familyOf(model)?.toolParser;
}

/**
 * The reasoning parser for `model`: `setting` unless it is `auto`, else the
 * family's; undefined for `none` or a model that does not reason.
 */
export function reasoningParserFor(model: string, setting: string): string | undefined {
  if (setting === "none") return undefined;
  if (setting !== "auto") return setting;
  return familyOf(model)?.reasoningParser;
}

/** Whether `model`'s template opens the thinking block, so that its answers start inside it. */
export function opensThinking(model: string): boolean {
  return familyOf(model)?.opensThinking === true;
}
