/**
 * Removes the reasoning of "thinking" models (`<think>...</think>`) from a
 * stream of text, so that no reasoning reaches a reply, a delta or the stored
 * history. Tags may be split across chunks; an unclosed block at the end is
 * dropped. Engines that split reasoning out themselves (vLLM's
 * `--reasoning-parser`) send it as `reasoning` (`reasoning_content` up to
 * v0.11), which never reaches a reply.
 *
 * Models whose chat template opens the block in the prompt (QwQ, DeepSeek-R1)
 * generate `reasoning...</think> answer`, with no opening tag: for them the
 * filter is made `opened`, and holds everything back until `</think>`. An
 * answer that never closes a block (the engine split the reasoning off after
 * all, or the model did not think) is let through whole at the end.
 *
 * @module
 */

const OPEN = "<think>";
const CLOSE = "</think>";

/** Options of {@linkcode ThinkingFilter}. */
export interface ThinkingFilterOptions {
  /**
   * The text starts inside a thinking block its template opened: held back
   * until `</think>`, or let through whole at the end if none comes.
   * @default {false}
   */
  readonly opened?: boolean;
}

/** A streaming filter: feed chunks with {@linkcode push}, then call {@linkcode end}. */
export class ThinkingFilter {
  #pending = "";
  #inside: boolean;
  #leading = true;
  /** Opened and not yet closed: all that came so far, to let through if no `</think>` comes. */
  #held: string | undefined;

  constructor(options: ThinkingFilterOptions = {}) {
    this.#inside = options.opened === true;
    this.#held = options.opened ? "" : undefined;
  }

  /** Returns the visible text that `chunk` makes certain. */
  push(chunk: string): string {
    if (this.#held !== undefined) {
      this.#held += chunk;
      const close = this.#held.indexOf(CLOSE);
      if (close === -1) return "";
      // The opened block closed: what follows it is the answer.
      const rest = this.#held.slice(close + CLOSE.length);
      this.#held = undefined;
      this.#inside = false;
      this.#pending = "";
      return this.push(rest);
    }
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
    if (this.#held !== undefined) {
      // No block was closed: the text held back was the answer (an `<think>` in it still opens one).
      const held = this.#held;
      this.#held = undefined;
      this.#inside = false;
      this.#pending = "";
      return this.push(held) + this.end();
    }
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
export function stripThinking(text: string, options: ThinkingFilterOptions = {}): string {
  const filter = new ThinkingFilter(options);
  return filter.push(text) + filter.end();
}
