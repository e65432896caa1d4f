/**
 * Coalesces streamed text into fewer, larger deltas: one MQTT message every
 * few tens of milliseconds or few dozen characters, not one per token.
 *
 * @module
 */

/** Options of {@linkcode DeltaCoalescer}. */
export interface DeltaCoalescerOptions {
  /**
   * Flush once this many characters are waiting.
   * @default {64}
   */
  readonly maxChars?: number;
  /**
   * Flush this many milliseconds after the first waiting character.
   * @default {50}
   */
  readonly maxDelayMs?: number;
}

/** Buffers text and hands it to `flush` in coalesced pieces, numbered from 0. */
export class DeltaCoalescer {
  readonly #flush: (seq: number, text: string) => void;
  readonly #maxChars: number;
  readonly #maxDelayMs: number;
  #buffer = "";
  #seq = 0;
  #timer: ReturnType<typeof setTimeout> | undefined;

  constructor(flush: (seq: number, text: string) => void, options: DeltaCoalescerOptions = {}) {
    this.#flush = flush;
    this.#maxChars = options.maxChars ?? 64;
    this.#maxDelayMs = options.maxDelayMs ?? 50;
  }

  push(text: string): void {
    if (text === "") return;
    this.#buffer += text;
    // The first piece goes out at once: time to first delta is what a user notices.
    if (this.#seq === 0 || this.#buffer.length >= this.#maxChars) {
      this.flush();
    } else {
      this.#timer ??= setTimeout(() => this.flush(), this.#maxDelayMs);
    }
  }

  /** Sends what is waiting now. */
  flush(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    if (this.#buffer === "") return;
    const text = this.#buffer;
    this.#buffer = "";
    this.#flush(this.#seq++, text);
  }

  /** Drops what is waiting and stops the timer (the request failed). */
  discard(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#buffer = "";
  }
}
