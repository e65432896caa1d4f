/**
 * Removes the reasoning of "thinking" models (`<think>...</think>`) from a
 * stream of text, so that no reasoning reaches a reply, a delta or the stored
 * history. Tags may be split across chunks; an unclosed block at the end is
 * dropped. Engines that split reasoning out themselves (vLLM's
 * `--reasoning-parser`) send it as `reasoning_content`, which is never read.
 *
 * @module
 */

const OPEN = "<think>";
const CLOSE = "</think>";

/** A streaming filter: feed chunks with {@linkcode push}, then call {@linkcode end}. */
export class ThinkingFilter {
  #pending = "";
  #inside = false;
  #leading = true;

  /** Returns the visible text that `chunk` makes certain. */
  push(chunk: string): string {
    this.#pending += chunk;
    let out = "";
    while (this.#pending.length > 0) {
      if (this.#inside) {
        const close = this.#pending.indexOf(CLOSE);
        if (close === -1) {
          // Keep only what could be the start of the closing tag.
          this.#pending = this.#pending.slice(
            this.#pending.length - partialSuffix(this.#pending, CLOSE),
          );
          return out;
        }
        this.#pending = this.#pending.slice(close + CLOSE.length);
        this.#inside = false;
        this.#leading = true;
        continue;
      }
      if (this.#leading) {
        // Answers after a block usually start with blank lines; drop them.
        this.#pending = this.#pending.replace(/^\s+/, "");
        if (this.#pending.length === 0) return out;
      }
      const open = this.#pending.indexOf(OPEN);
      if (open !== -1) {
        out += this.#emit(this.#pending.slice(0, open));
        this.#pending = this.#pending.slice(open + OPEN.length);
        this.#inside = true;
        continue;
      }
      const keep = partialSuffix(this.#pending, OPEN);
      out += this.#emit(this.#pending.slice(0, this.#pending.length - keep));
      this.#pending = this.#pending.slice(this.#pending.length - keep);
      return out;
    }
    return out;
  }

  /** Returns what is left at the end of the stream; an unclosed block is dropped. */
  end(): string {
    const rest = this.#inside ? "" : this.#pending;
    this.#pending = "";
    return this.#emit(rest);
  }

  #emit(text: string): string {
    if (text.length > 0) this.#leading = false;
    return text;
  }
}

/** Length of the longest suffix of `text` that is a proper prefix of `tag`. */
function partialSuffix(text: string, tag: string): number {
  for (let n = Math.min(tag.length - 1, text.length); n > 0; n--) {
    if (text.endsWith(tag.slice(0, n))) return n;
  }
  return 0;
}

/** Removes reasoning from a whole text at once. */
export function stripThinking(text: string): string {
  const filter = new ThinkingFilter();
  return filter.push(text) + filter.end();
}
