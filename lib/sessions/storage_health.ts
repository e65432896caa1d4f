/**
 * Whether the session store can be written: a circuit opened by a store
 * write that fails for want of space (or by a disk error), and closed by a
 * background probe. While it is open, turns are refused with
 * `storage_unavailable` before anything is generated: a turn that cannot be
 * saved is not worth generating, and a client told at once can retry later.
 *
 * On a full disk, Deno KV's SQLite fails every write with "database or disk
 * is full" (reads still work on an open connection), and opening the store
 * fails with "disk I/O error" (its `-shm` file cannot be sized) or "database
 * or disk is full" (a new store). Nothing is written in part: the atomic
 * operation is rolled back, so the failed turn leaves the history as it was.
 *
 * The probe writes and deletes a small record in the store (every 5 s while
 * healthy, every second while not). To close the circuit it must also find
 * some room on the disk ({@linkcode checkHeadroom}): SQLite reuses the space
 * of its write-ahead log, so a small write may succeed on a disk with no
 * room left, and a store let back at the first such success took a few turns
 * and failed again.
 *
 * @module
 */

import { join } from "node:path";
import { abortableSleep, ProbeLoop } from "../_util.ts";
import { logger } from "../log.ts";
import { ServiceError } from "../protocol/errors.ts";

/** Options of {@linkcode StorageHealth}. */
export interface StorageHealthOptions {
  /**
   * Tries a small write; rejects when the store cannot be written. `down`:
   * the circuit is open, and the probe must also see room to work in.
   */
  readonly probe: (down: boolean) => Promise<void>;
  /**
   * Milliseconds between probes while the store is writable.
   * @default {5000}
   */
  readonly intervalMs?: number;
  /**
   * Milliseconds between probes while it is not.
   * @default {1000}
   */
  readonly downIntervalMs?: number;
  /** Waits `ms` or until `signal` aborts (rejecting); injected by tests. */
  readonly sleep?: (ms: number, signal: AbortSignal) => Promise<void>;
}

/** Milliseconds a refused client is told to wait before trying again. */
export const STORAGE_RETRY_AFTER_MS = 5000;

const log = logger("sessions");
/** Finds `why` in a message of {@linkcode storageUnavailable}. */
const REASON_IN_MESSAGE = /^the session store cannot be written \((.*)\): nothing of this turn/;

/** A circuit breaker with a write probe, for one session store. */
export class StorageHealth {
  readonly #options: Required<StorageHealthOptions>;
  readonly #loop: ProbeLoop;
  /** Why the store is unavailable; undefined while it is writable. */
  #reason: string | undefined;
  #outages = 0;

  constructor(options: StorageHealthOptions) {
    this.#options = {
      intervalMs: 5000,
      downIntervalMs: 1000,
      sleep: abortableSleep,
      ...options,
    };
    const { intervalMs, downIntervalMs, sleep } = this.#options;
    this.#loop = new ProbeLoop(
      () => this.probeNow(),
      () => this.#reason === undefined ? intervalMs : downIntervalMs,
      sleep,
    );
  }

  /** Starts probing in the background. */
  start(): this {
    this.#loop.start();
    return this;
  }

  /** Stops probing. */
  async close(): Promise<void> {
    await this.#loop.close();
  }

  /** Whether the store can be written, as far as is known. */
  get available(): boolean {
    return this.#reason === undefined;
  }

  /** Why it cannot be written (undefined while it can). */
  get reason(): string | undefined {
    return this.#reason;
  }

  /** Times the circuit has opened. */
  get outages(): number {
    return this.#outages;
  }

  /**
   * A store write failed: when for want of space or a disk error, the
   * circuit opens. Returns whether it was such a failure.
   */
  failed(error: unknown): boolean {
    const why = storageFailure(error);
    if (why === undefined) return false;
    this.#goDown(why);
    return true;
  }

  /**
   * Throws `storage_unavailable` while the store cannot be written.
   *
   * @throws {ServiceError}
   */
  check(): void {
    if (this.#reason !== undefined) throw storageUnavailable(this.#reason);
  }

  /** Probes once now; resolves with whether the store could be written. */
  async probeNow(): Promise<boolean> {
    const down = this.#reason !== undefined;
    try {
      await this.#options.probe(down);
    } catch (error) {
      this.#goDown(storageFailure(error) ?? (error as Error)?.message ?? String(error));
      return false;
    }
    if (down) this.#comeBack();
    return true;
  }

  /** The store cannot be written: turns are refused until the probe sees it writable. */
  #goDown(why: string): void {
    if (this.#reason !== undefined) {
      this.#reason = why;
      return;
    }
    this.#reason = why;
    this.#outages++;
    log.warn("Session store cannot be written ({why}): refusing turns until it can", { why });
    this.#loop.wake(); // the circuit just opened: probe at the shorter interval
  }

  /** The store can be written again. */
  #comeBack(): void {
    this.#reason = undefined;
    log.info("Session store can be written again: taking turns");
  }
}

/**
 * Why `error` means the store cannot be written for want of space (or a
 * failing disk), or undefined when it is some other failure. The messages are
 * SQLite's (through Deno KV) and the OS's.
 */
export function storageFailure(error: unknown): string | undefined {
  if (error instanceof ServiceError) {
    // One from a worker (it crossed a thread as code and message): its reason is in the message.
    if (error.code !== "storage_unavailable") return undefined;
    return REASON_IN_MESSAGE.exec(error.message)?.[1] ?? "a write failed";
  }
  const message = (error as Error)?.message ?? String(error);
  if (/database or disk is full|no space left on device|ENOSPC|os error 28\b/i.test(message)) {
    return "the disk is full";
  }
  if (/disk quota exceeded|EDQUOT|os error 122\b/i.test(message)) {
    return "the disk quota is exceeded";
  }
  if (/disk I\/O error|read-only file system|EROFS|os error 30\b/i.test(message)) {
    return `the disk cannot be written (${message})`;
  }
  return undefined;
}

/** `error` as `storage_unavailable` when it is a storage failure, else undefined. */
export function asStorageError(error: unknown): ServiceError | undefined {
  if (error instanceof ServiceError) {
    return error.code === "storage_unavailable" ? error : undefined;
  }
  const why = storageFailure(error);
  return why === undefined ? undefined : storageUnavailable(why, error);
}

/** The error a turn gets while the store cannot be written. */
export function storageUnavailable(why: string, cause?: unknown): ServiceError {
  return new ServiceError(
    "storage_unavailable",
    `the session store cannot be written (${why}): nothing of this turn was saved; try again later`,
    { retryAfterMs: STORAGE_RETRY_AFTER_MS, cause },
  );
}

/**
 * Writes and removes a file of `bytes` in `dir`: whether the disk has room
 * for more than the next record. Random content, so that a compressing file
 * system counts it whole.
 */
export async function checkHeadroom(dir: string, bytes: number): Promise<void> {
  const path = join(dir, `.headroom-${crypto.randomUUID().slice(0, 8)}`);
  const block = new Uint8Array(Math.min(bytes, 65536));
  crypto.getRandomValues(block);
  try {
    using file = await Deno.open(path, { write: true, createNew: true });
    for (let written = 0; written < bytes;) {
      written += await file.write(block.subarray(0, Math.min(block.length, bytes - written)));
    }
    await file.sync();
  } finally {
    await Deno.remove(path).catch(() => {});
  }
}
