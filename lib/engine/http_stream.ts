/**
 * The engine's streamed answers read straight from the socket: a small
 * HTTP/1.1 client for the one hot request, a chat completion POSTed to an
 * `http:` engine, with its connections kept alive and reused.
 *
 * Why: Deno's `fetch` hands a body on frame by frame through a byte
 * `ReadableStream`, and an engine sends one chunked frame per token; that
 * machinery and its garbage cost more CPU per token than everything else the
 * service does with it (see docs/benchmarks.md). Here a socket read holds as
 * many frames as have arrived, and the chunked framing is undone in place
 * (`socket_reader.ts`).
 *
 * The `openai` client still sends every other request, and the errors of this
 * one are its errors (`OpenAI.APIError`), built from the engine's answer the
 * way it builds them. An `https:` engine, or one reached through a proxy
 * (`HTTP_PROXY` and the like in the environment), is left to `fetch`: see
 * {@linkcode directlyReachable}.
 *
 * @module
 */

import { SocketReader } from "./socket_reader.ts";

/** An answer whose head has been read; its body is read from `body`. */
export interface StreamedResponse {
  readonly status: number;
  readonly headers: Headers;
  /** The body, unframed; breaking off early closes or drains the connection. */
  readonly body: AsyncIterable<Uint8Array>;
}

const ENCODER = new TextEncoder();
const LATIN1 = new TextDecoder("latin1");
/** A kept-alive connection older than this is not reused (uvicorn closes them after 5 s). */
const IDLE_MS = 4000;
/** Bytes read to finish a body that was broken off, so that its connection can be reused. */
const DRAIN_BYTES = 64 * 1024;

/** Whether requests to `url` may bypass `fetch`: plain HTTP, no proxy configured. */
export function directlyReachable(url: URL): boolean {
  if (url.protocol !== "http:") return false;
  for (const name of ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]) {
    try {
      if (Deno.env.get(name)) return false;
    } catch {
      return false; // not allowed to look: be safe
    }
  }
  return true;
}

/** A connection and its reader, whose buffer it keeps from request to request. */
interface Connection {
  readonly conn: Deno.TcpConn;
  readonly reader: SocketReader;
}

interface Idle extends Connection {
  readonly since: number;
}

/** Connections to one engine (`host:port`), reused while they are kept alive. */
export class HttpStreamClient {
  readonly #hostname: string;
  readonly #port: number;
  readonly #host: string;
  readonly #idle: Idle[] = [];
  #closed = false;

  constructor(origin: URL) {
    this.#hostname = origin.hostname.replace(/^\[|\]$/g, "");
    this.#port = origin.port === "" ? 80 : Number(origin.port);
    this.#host = origin.host;
  }

  /**
   * POSTs `body` (JSON) to `path` and resolves once the answer's head is in.
   * A kept-alive connection the engine closed meanwhile is retried once on a
   * new one. `signal` aborting closes the connection.
   */
  async post(
    path: string,
    headers: Record<string, string>,
    body: string,
    signal: AbortSignal,
  ): Promise<StreamedResponse> {
    signal.throwIfAborted();
    const payload = ENCODER.encode(body);
    let head = `POST ${path} HTTP/1.1\r\nhost: ${this.#host}\r\n`;
    for (const [name, value] of Object.entries(headers)) head += `${name}: ${value}\r\n`;
    head += `content-length: ${payload.length}\r\n\r\n`;
    const request = new Uint8Array(head.length + payload.length);
    request.set(ENCODER.encode(head));
    request.set(payload, head.length);
    for (;;) {
      const reused = this.#take();
      const { conn, reader } = reused ?? await this.#connect();
      const onAbort = () => conn.close();
      if (signal.aborted) {
        conn.close();
        signal.throwIfAborted();
      }
      signal.addEventListener("abort", onAbort, { once: true });
      let responded = false;
      try {
        await writeAll(conn, request);
        const response = await readHead(reader, () => responded = true);
        return this.#respond({ conn, reader }, response, signal, onAbort);
      } catch (error) {
        signal.removeEventListener("abort", onAbort);
        try {
          conn.close();
        } catch { /* closed by the abort */ }
        // A reused connection the engine had closed: nothing was answered, try a new one.
        if (reused && !responded && !signal.aborted) continue;
        signal.throwIfAborted();
        throw error;
      }
    }
  }

  /** Closes the idle connections; later requests open new ones. */
  close(): void {
    this.#closed = true;
    for (const { conn } of this.#idle.splice(0)) conn.close();
  }

  async #connect(): Promise<Connection> {
    const conn = await Deno.connect({ hostname: this.#hostname, port: this.#port });
    return { conn, reader: new SocketReader(conn) };
  }

  #take(): Connection | undefined {
    const now = performance.now();
    for (let idle; (idle = this.#idle.pop());) {
      if (now - idle.since < IDLE_MS) return idle;
      idle.conn.close();
    }
    return undefined;
  }

  #release(connection: Connection): void {
    // Bytes after the end of the answer: the connection is out of step; not reused.
    if (this.#closed || connection.reader.pending) connection.conn.close();
    else this.#idle.push({ ...connection, since: performance.now() });
  }

  #respond(
    connection: Connection,
    head: { status: number; headers: Headers },
    signal: AbortSignal,
    onAbort: () => void,
  ): StreamedResponse {
    const { conn, reader } = connection;
    const { headers } = head;
    const keepAlive = !/\bclose\b/i.test(headers.get("connection") ?? "");
    const chunked = /\bchunked\b/i.test(headers.get("transfer-encoding") ?? "");
    const lengthHeader = headers.get("content-length");
    const length = chunked || lengthHeader === null ? undefined : Number(lengthHeader);
    const frames = chunked
      ? reader.chunked()
      : length !== undefined && Number.isSafeInteger(length) && length >= 0
      ? reader.exactly(length)
      : reader.untilClose();
    const reusable = keepAlive && (chunked || length !== undefined);
    let finished = false;
    const done = (clean: boolean) => {
      if (finished) return;
      finished = true;
      signal.removeEventListener("abort", onAbort);
      if (clean && reusable && !signal.aborted) this.#release(connection);
      else {
        try {
          conn.close();
        } catch { /* closed by the abort */ }
      }
    };
    // deno-lint-ignore no-this-alias
    const client = this;
    return {
      status: head.status,
      headers,
      body: {
        async *[Symbol.asyncIterator]() {
          let state = "reading" as "reading" | "whole" | "failed";
          try {
            for (;;) {
              let next;
              try {
                next = await frames.next();
              } catch (error) {
                state = "failed";
                throw error;
              }
              if (next.done) {
                state = "whole";
                return;
              }
              yield next.value;
            }
          } finally {
            if (state === "whole") done(true);
            else if (state === "failed" || !reusable || signal.aborted) done(false);
            // Broken off (the stream's [DONE] came): the end of the body is on its way.
            else client.#drain(frames, done);
          }
        },
      },
    };
  }

  /** Reads what is left of a body (a little, briefly), then reuses or closes the connection. */
  #drain(frames: AsyncIterator<Uint8Array>, done: (clean: boolean) => void): void {
    let bytes = 0;
    const timer = setTimeout(() => done(false), 1000);
    (async () => {
      for (;;) {
        const next = await frames.next();
        if (next.done) return true;
        bytes += next.value.length;
        if (bytes > DRAIN_BYTES) return false;
      }
    })().then((clean) => done(clean), () => done(false)).finally(() => clearTimeout(timer));
  }
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let written = 0; written < bytes.length;) {
    written += await conn.write(bytes.subarray(written));
  }
}

/** Reads the status line and headers. */
async function readHead(
  reader: SocketReader,
  responded: () => void,
): Promise<{ status: number; headers: Headers }> {
  for (;;) {
    const line = await reader.head();
    responded();
    const lines = LATIN1.decode(line).split("\r\n");
    const status = /^HTTP\/1\.[01] (\d{3})/.exec(lines[0]);
    if (!status) throw new TypeError("the engine's answer is not HTTP/1.1");
    const code = Number(status[1]);
    // An interim answer (100 Continue, 103 Early Hints): the real one follows.
    if (code >= 100 && code < 200) continue;
    const headers = new Headers();
    for (const field of lines.slice(1)) {
      const colon = field.indexOf(":");
      if (colon <= 0) continue;
      try {
        headers.append(field.slice(0, colon).trim(), field.slice(colon + 1).trim());
      } catch { /* a header Headers does not take: not one read here */ }
    }
    return { status: code, headers };
  }
}
