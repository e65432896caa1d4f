/**
 * How replies to a request are written, and the one rule that infers it
 * from a payload. The original deployment's clients read plain text and
 * never say so; v1 clients read JSON. A payload's `format` wins; without one,
 * the form the payload is written in decides.
 *
 * @module
 */

/**
 * How replies to a request are written: v1 JSON, or the original's plain
 * text; `hint`, a game's hint object, is for answers to state messages only.
 */
export type ReplyStyle = "json" | "text" | "hint";

/**
 * The reply style a payload asks for: its `format` when that is `"json"` or
 * `"text"`; otherwise plain text for a payload in the original deployment's
 * form (`original`), JSON for a v1 one. What counts as the original's form is
 * the caller's to tell: a request and a control message show it differently.
 */
export function replyStyle(format: unknown, original: boolean): "json" | "text" {
  if (format === "json" || format === "text") return format;
  return original ? "text" : "json";
}
