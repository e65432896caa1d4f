/**
 * What a SIGINT or SIGTERM means: the first starts a graceful stop, a second
 * stops at once, and a copy of the first is not a second.
 *
 * Copies are what `deno task` makes. A Ctrl-C in a terminal sends SIGINT to
 * the whole foreground process group, `deno task` and the service alike, and
 * `deno task` then passes the signal it got on to the service: one key press,
 * two SIGINTs a fraction of a millisecond apart. `timeout` (which signals its
 * child and then its process group) and `kill -INT -PGID` do the same with
 * SIGTERM and SIGINT. Whether the service sees one or two depends on whether
 * the second arrives before Deno has read the first (they then merge), so
 * without this rule one Ctrl-C sometimes stopped at once. A signal does not
 * say who sent it (Deno does not pass on `si_pid`), so the copy is told by
 * what is left: the same signal again within {@link REPEAT_WINDOW_MS} of the
 * one that started the stop. Measured in a terminal, the copy reaches the
 * program's listener 1 to 3 ms after the original (0.2 ms apart as the kernel
 * delivers them, plus the first one's handling), and up to 7 ms on two cores
 * under a load of 19. A person's second Ctrl-C, meant to stop at once, comes
 * after the first one's "stopping" line was read, well past the window. The
 * window errs on the long side: a copy taken for a second request would drop
 * the answers being generated, where a quick double press taken for one only
 * asks for a third. A different signal (a SIGTERM after a SIGINT) is a second
 * request whenever it comes.
 *
 * @module
 */

/** A stop was asked for (SIGINT, SIGTERM) before the service served. */
export class StartInterruptedError extends Error {
  readonly code = "start_interrupted";
  constructor(readonly signal: Deno.Signal) {
    super(`${signal} during start-up`);
    this.name = "StartInterruptedError";
  }
}

/** How soon a repeat of the signal that started the stop counts as a copy of it, in ms. */
export const REPEAT_WINDOW_MS = 250;

/** What a signal asks for. */
export type SignalMeaning =
  /** Stop gracefully: the first request to stop. */
  | "stop"
  /** Nothing: the signal that started the stop, passed on a second time. */
  | "copy"
  /** Stop at once: a second request. */
  | "now";

/** Options of {@linkcode StopSignals}. */
export interface StopSignalsOptions {
  /**
   * How soon a repeat of the first signal is a copy of it, in milliseconds.
   * @default {REPEAT_WINDOW_MS}
   */
  readonly repeatWindowMs?: number;
  /**
   * The clock, in milliseconds.
   * @default {() => performance.now()}
   */
  readonly now?: () => number;
}

/** Tells, signal by signal, a request to stop from a request to stop at once. */
export class StopSignals {
  readonly #windowMs: number;
  readonly #now: () => number;
  #first: { readonly signal: Deno.Signal; readonly at: number } | undefined;
  #stopping = false;

  constructor(options: StopSignalsOptions = {}) {
    this.#windowMs = options.repeatWindowMs ?? REPEAT_WINDOW_MS;
    this.#now = options.now ?? (() => performance.now());
  }

  /** Whether a stop has begun (by a signal or by {@linkcode StopSignals.stopping}). */
  get stopping(): boolean {
    return this.#stopping;
  }

  /** A stop began for another reason (a part failed): any signal from now on stops at once. */
  stop(): void {
    this.#stopping = true;
  }

  /** Milliseconds since the signal that started the stop (undefined before one came). */
  sinceFirstMs(): number | undefined {
    return this.#first && this.#now() - this.#first.at;
  }

  /** What `signal`, arriving now, asks for. */
  receive(signal: Deno.Signal): SignalMeaning {
    const now = this.#now();
    if (!this.#stopping) {
      this.#stopping = true;
      this.#first = { signal, at: now };
      return "stop";
    }
    const first = this.#first;
    if (first?.signal === signal && now - first.at <= this.#windowMs) return "copy";
    return "now";
  }
}
