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
  /**
   * Calls `flush` after `ms` milliseconds; returns what cancels the call.
   * @default {setTimeout}
   */
  readonly schedule?: (flush: () => void, ms: number) => () => void;
}

function scheduleWithTimer(flush: () => void, ms: number): () => void {
  const timer = setTimeout(flush, ms);
  return () => clearTimeout(timer);
}

/** Buffers text and hands it to `flush` in coalesced pieces, numbered from 0. */
export class DeltaCoalescer {
  readonly #flush: (seq: number, text: string) => void;
  readonly #maxChars: number;
  readonly #maxDelayMs: number;
  #buffer = "";
  #seq = 0;
  readonly #schedule: (flush: () => void, ms: number) => () => void;
  /** Cancels the pending timed flush, if there is one. */
  #cancelTimer: (() => void) | undefined;

  constructor(flush: (seq: number, text: string) => void, options: DeltaCoalescerOptions = {}) {
    this.#flush = flush;
    this.#maxChars = options.maxChars ?? 64;
    this.#maxDelayMs = options.maxDelayMs ?? 50;
    this.#schedule = options.schedule ?? scheduleWithTimer;
  }

  push(text: string): void {
    if (text === "") return;
    this.#buffer += text;
    // The first piece goes out at once: time to first delta is what a user notices.
    if (this.#seq === 0 || this.#buffer.length >= this.#maxChars) {
      this.flush();
    } else {
      this.#cancelTimer ??= this.#schedule(() => this.flush(), this.#maxDelayMs);
    }
  }

  /** Sends what is waiting now. */
  flush(): void {
    this.#stopTimer();
    if (this.#buffer === "") return;
    const text = this.#buffer;
    this.#buffer = "";
    this.#flush(this.#seq++, text);
  }

  /** Drops what is waiting and stops the timer (the request failed). */
  discard(): void {
    this.#stopTimer();
    this.#buffer = "";
  }

  #stopTimer(): void {
    this.#cancelTimer?.();
    this.#cancelTimer = undefined;
  }
}
