/**
 * Logging set-up (`@logtape/logtape`): text or JSON lines on standard error.
 * Modules log through `getLogger(["vllm-mqtt", ...])`.
 *
 * @module
 */

import {
  configure,
  getLogger,
  getTextFormatter,
  type Logger,
  type LogRecord,
  reset,
} from "@logtape/logtape";

/** Options of {@linkcode setupLogging}. */
export interface LogOptions {
  readonly level: "debug" | "info" | "warning" | "error";
  readonly format: "text" | "json";
}

const encoder = new TextEncoder();

/** A value in a message: a string as it is, anything else as compact JSON. */
function renderValue(value: unknown): string {
  return typeof value === "string" ? value : JSON.stringify(value);
}

// One line per record.
const textFormatter = getTextFormatter({ value: renderValue });

/**
 * A record as one JSON object (the fields of logtape's JSON Lines format),
 * its message rendered as the text format renders it: logtape's own quotes
 * each string value inside the message (`http://"127.0.0.1":8081`).
 */
export function jsonLine(record: LogRecord): string {
  let message = "";
  record.message.forEach((part, i) => message += i % 2 === 0 ? part : renderValue(part));
  return JSON.stringify({
    "@timestamp": new Date(record.timestamp).toISOString(),
    level: record.level === "warning" ? "WARN" : record.level.toUpperCase(),
    message,
    logger: record.category.join("."),
    properties: record.properties,
  });
}

/** Routes every `vllm-mqtt` logger to standard error at `level` and above. */
export async function setupLogging(options: LogOptions): Promise<void> {
  const format = options.format === "json" ? jsonLine : textFormatter;
  await configure({
    reset: true,
    sinks: {
      stderr: (record: LogRecord) => {
        const line = format(record);
        Deno.stderr.writeSync(encoder.encode(line.endsWith("\n") ? line : `${line}\n`));
      },
    },
    loggers: [
      { category: ["vllm-mqtt"], lowestLevel: options.level, sinks: ["stderr"] },
      { category: ["logtape", "meta"], lowestLevel: "warning", sinks: ["stderr"] },
    ],
  });
}

/** Stops logging (at exit). */
export async function closeLogging(): Promise<void> {
  await reset();
}

/** The logger of one part of the program, e.g. `logger("gateway")`. */
export function logger(part: string): Logger {
  return getLogger(["vllm-mqtt", part]);
}

/** Options of {@linkcode LogThrottle}. */
export interface LogThrottleOptions {
  /**
   * Per kind of event, at most one line in this many milliseconds.
   * @default {60000}
   */
  readonly everyMs?: number;
  /**
   * The clock, in milliseconds.
   * @default {() => performance.now()}
   */
  readonly now?: () => number;
}

/**
 * Keeps a flood of one kind of event (a client sending what cannot be
 * served) to one log line a minute, each saying how many were left out.
 */
export class LogThrottle {
  readonly #everyMs: number;
  readonly #now: () => number;
  readonly #kinds = new Map<string, { loggedAt: number; left: number }>();

  constructor(options: LogThrottleOptions = {}) {
    this.#everyMs = options.everyMs ?? 60_000;
    this.#now = options.now ?? (() => performance.now());
  }

  /**
   * Whether to log an event of `kind` now: undefined when not, else how many
   * of its kind were left out since the last line.
   */
  take(kind: string): number | undefined {
    const now = this.#now();
    const last = this.#kinds.get(kind);
    if (last && now - last.loggedAt < this.#everyMs) {
      last.left++;
      return undefined;
    }
    this.#kinds.set(kind, { loggedAt: now, left: 0 });
    return last?.left ?? 0;
  }
}

/** The end of a throttled log line: how many like it were left out before it. */
export function leftOut(count: number): string {
  return count === 0 ? "" : ` (and ${count} more like it since the last such line, not logged)`;
}
