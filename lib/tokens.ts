/**
 * Token estimates for text the engine has not counted yet. The engine's own
 * `usage` is exact for the served model and wins wherever it is known
 * (DESIGN principle 5); this is the fallback, with cl100k_base as a stand-in:
 * its tables take half the memory of o200k_base's (38 MB against 75 MB in
 * every worker that loads them) for an estimate that is only ever a guess.
 *
 * @module
 */

import { countTokens } from "gpt-tokenizer/encoding/cl100k_base";

/** Tokens a chat template adds around each message (role markers, separators). */
export const MESSAGE_OVERHEAD_TOKENS = 4;

// User text may contain strings that look like special tokens; count them as text.
const AS_TEXT = { disallowedSpecial: new Set<string>() };

/** Estimated tokens of one chat message holding `text`, template overhead included. */
export function estimateMessageTokens(text: string): number {
  return countTokens(text, AS_TEXT) + MESSAGE_OVERHEAD_TOKENS;
}

const promptEstimates = new Map<string, number>();

/**
 * {@linkcode estimateMessageTokens} of a system prompt, remembered: the same
 * few prompts come with every turn, and a long one costs real time to count.
 */
export function estimatePromptTokens(prompt: string): number {
  let tokens = promptEstimates.get(prompt);
  if (tokens === undefined) {
    tokens = estimateMessageTokens(prompt);
    if (promptEstimates.size >= 64) promptEstimates.clear();
    promptEstimates.set(prompt, tokens);
  }
  return tokens;
}
