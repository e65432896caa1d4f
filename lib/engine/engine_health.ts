/**
 * Whether the engine can take requests: a circuit breaker fed by request
 * outcomes and by a background health probe. While the circuit is open no
 * request is sent; each waits (up to a bound) for the probe to see the engine
 * back, instead of piling failed calls onto an engine that is restarting.
 *
 * @module
 */

import { abortableSleep, ProbeLoop } from "../_util.ts";
import { logger } from "../log.ts";
import { ServiceError } from "../protocol/errors.ts";

/** Options of {@linkcode EngineHealth}. */
export interface EngineHealthOptions {
  /** URL probed with GET; a 2xx answer means healthy. */
  readonly probeUrl: string;
  /** Sent as `Authorization: Bearer` with each probe. */
  readonly apiKey?: string;
  /**
   * Milliseconds between probes while the engine is healthy.
   * @default {5000}
   */
  readonly intervalMs?: number;
  /**
   * Milliseconds between probes while the circuit is open.
   * @default {1000}
   */
  readonly downIntervalMs?: number;
  /**
   * Consecutive requests failing with `engine_unavailable` that open the circuit.
   * @default {3}
   */
  readonly failureThreshold?: number;
  /**
   * The engine's id in log lines, when there are several (`e1`).
   * @default {undefined}
   */
  readonly name?: string;
  /**
   * Told each time the circuit opens (`down`) or closes (`ready`).
   * @default {undefined}
   */
  readonly onChange?: (state: EngineState) => void;
}

/** `ready`: requests flow. `down`: the circuit is open and the probe waits for the engine. */
export type EngineState = "ready" | "down";

const log = logger("engine");

/** A circuit breaker with a health probe, for one engine. */
export class EngineHealth {
  readonly #options:
    & Required<Omit<EngineHealthOptions, "apiKey" | "name" | "onChange">>
    & Pick<EngineHealthOptions, "apiKey" | "name" | "onChange">;
  readonly #loop: ProbeLoop;
  #state: EngineState = "ready";
  #failures = 0;
  #outages = 0;
  #waiters = new Set<() => void>();

  constructor(options: EngineHealthOptions) {
    this.#options = {
      intervalMs: 5000,
      downIntervalMs: 1000,
      failureThreshold: 3,
      ...options,
    };
    this.#loop = new ProbeLoop(
      () => this.#probeOnce(),
      () => this.#state === "ready" ? this.#options.intervalMs : this.#options.downIntervalMs,
    );
  }

  /** Starts probing in the background. */
  start(): this {
    this.#loop.start();
    return this;
  }

  /** Stops probing and releases every waiting request with `engine_unavailable`. */
  async close(): Promise<void> {
    const closing = this.#loop.close();
    this.#release();
    await closing;
  }

  get state(): EngineState {
    return this.#state;
  }

  /** Times the circuit has opened. */
  get outages(): number {
    return this.#outages;
  }

  /** A request reached the engine and got an answer. */
  succeeded(): void {
    this.#failures = 0;
  }

  /** A request could not be served by the engine (`engine_unavailable`). */
  failed(): void {
    if (++this.#failures >= this.#options.failureThreshold) this.#goDown("requests are failing");
  }

  /**
   * A request failed with `engine_unavailable`: is the engine itself down
   * (loading, restarting, unreachable)? Probes it now. Down: the circuit
   * opens at once, so that this request and the next wait for it to come
   * back ({@linkcode ready}) rather than fail one by one until the threshold
   * is reached; answering: the failure was the request's own (a broken
   * stream, a 429 from a busy engine), and false is returned.
   */
  async confirmDown(): Promise<boolean> {
    // Probed even with the circuit open: requests failing in a row open it too, and an engine
    // that answers its probe (a busy one, answering 429) is not down.
    if (await this.#probe()) return false;
    this.#goDown("a request failed and the health probe too");
    // Probe at the shorter interval from now on, not after the healthy one's wait.
    this.#loop.wake();
    return true;
  }

  /**
   * Resolves at once while the engine is ready; otherwise waits up to
   * `timeoutMs` for it to come back.
   *
   * @throws {ServiceError} `engine_unavailable` when it does not come back in time,
   * or the reason `signal` aborts with.
   */
  async ready(timeoutMs: number, signal: AbortSignal): Promise<void> {
    if (this.#state === "ready") return;
    const { promise: woken, resolve: wake } = Promise.withResolvers<void>();
    this.#waiters.add(wake);
    const settled = new AbortController();
    const timer = abortableSleep(timeoutMs, AbortSignal.any([signal, settled.signal]));
    timer.catch(() => {});
    try {
      await Promise.race([woken, timer]);
    } catch {
      throw signal.reason instanceof ServiceError ? signal.reason : unavailable();
    } finally {
      settled.abort();
      this.#waiters.delete(wake);
    }
    // Woken by close() rather than by recovery.
    if (this.#loop.signal.aborted) throw unavailable();
  }

  /** The engine stopped answering: requests wait for the probe to see it back. */
  #goDown(why: string): void {
    if (this.#state === "down") return;
    this.#state = "down";
    this.#outages++;
    log.warn("Engine {name}unavailable ({why}); holding requests until it answers again", {
      name: this.#named,
      why,
    });
    this.#options.onChange?.("down");
  }

  /** The engine answers again: waiting requests go on, new ones flow. */
  #comeBack(): void {
    this.#state = "ready";
    this.#failures = 0;
    log.info("Engine {name}is answering again", { name: this.#named });
    this.#release();
    this.#options.onChange?.("ready");
  }

  /** The engine's name and a space, for log lines (nothing when it is the only one). */
  get #named(): string {
    return this.#options.name === undefined ? "" : `${this.#options.name} `;
  }

  #release(): void {
    for (const wake of this.#waiters) wake();
    this.#waiters.clear();
  }

  async #probeOnce(): Promise<void> {
    const healthy = await this.#probe();
    if (healthy && this.#state === "down") this.#comeBack();
    if (!healthy && this.#state === "ready") this.#goDown("health probe failed");
  }

  #probe(): Promise<boolean> {
    const { probeUrl, apiKey } = this.#options;
    return probe(probeUrl, {
      apiKey,
      signal: AbortSignal.any([AbortSignal.timeout(5000), this.#loop.signal]),
    });
  }
}

/** Whether GET `url` answers 2xx before `signal` aborts; never throws. */
export async function probe(
  url: string,
  options: { apiKey?: string; signal: AbortSignal },
): Promise<boolean> {
  try {
    const response = await fetch(url, {
      headers: options.apiKey ? { authorization: `Bearer ${options.apiKey}` } : {},
      signal: options.signal,
    });
    await response.body?.cancel();
    return response.ok;
  } catch {
    return false;
  }
}

function unavailable(): ServiceError {
  return new ServiceError("engine_unavailable", "the engine is not answering; try again later", {
    retryAfterMs: 5000,
  });
}
