/**
 * Token estimates for text the engine has not counted yet. The engine's own
 * `usage` is exact for the served model and wins wherever it is known
 * (DESIGN principle 5); this is the fallback, with o200k_base as a stand-in.
 *
 * @module
 */

import { countTokens } from "gpt-tokenizer";

/** Tokens a chat template adds around each message (role markers, separators). */
export const MESSAGE_OVERHEAD_TOKENS = 4;

// User text may contain strings that look like special tokens; count them as text.
const AS_TEXT = { disallowedSpecial: new Set<string>() };

/** Estimated tokens of one chat message holding `text`, template overhead included. */
export function estimateMessageTokens(text: string): number {
  return countTokens(text, AS_TEXT) + MESSAGE_OVERHEAD_TOKENS;
}
