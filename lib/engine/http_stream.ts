/**
 * The engine's streamed answers read straight from the socket: a small
 * HTTP/1.1 client for the one hot request, a chat completion POSTed to an
 * `http:` engine, with its connections kept alive and reused.
 *
 * Why: Deno's `fetch` hands a body on frame by frame through a byte
 * `ReadableStream`, and an engine sends one chunked frame per token; that
 * machinery and its garbage cost more CPU per token than everything else the
 * service does with it (see docs/benchmarks.md). Here a socket read holds as
 * many frames as have arrived, and the chunked framing is undone in place.
 *
 * The `openai` client still sends every other request, and the errors of this
 * one are its errors (`OpenAI.APIError`), built from the engine's answer the
 * way it builds them. An `https:` engine, or one reached through a proxy
 * (`HTTP_PROXY` and the like in the environment), is left to `fetch`: see
 * {@linkcode directlyReachable}.
 *
 * @module
 */

/** An answer whose head has been read; its body is read from `body`. */
export interface StreamedResponse {
  readonly status: number;
  readonly headers: Headers;
  /** The body, unframed; breaking off early closes or drains the connection. */
  readonly body: AsyncIterable<Uint8Array>;
}

const ENCODER = new TextEncoder();
const LATIN1 = new TextDecoder("latin1");
const CRLF_CRLF = [13, 10, 13, 10];
const MAX_HEAD_BYTES = 64 * 1024;
const READ_BYTES = 16 * 1024;
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

/** Buffered reads of one connection. */
class SocketReader {
  readonly #conn: Deno.Conn;
  #buffer = new Uint8Array(READ_BYTES);
  #start = 0;
  #end = 0;

  constructor(conn: Deno.Conn) {
    this.#conn = conn;
  }

  /** Whether bytes beyond what was asked for are waiting (an answer the engine did not owe). */
  get pending(): boolean {
    return this.#end > this.#start;
  }

  /** Reads more; false at the end of the connection. */
  async #fill(): Promise<boolean> {
    if (this.#start === this.#end) {
      this.#start = this.#end = 0;
    } else if (this.#end === this.#buffer.length) {
      const kept = this.#end - this.#start;
      if (this.#start > 0) {
        this.#buffer.copyWithin(0, this.#start, this.#end);
      } else {
        const bigger = new Uint8Array(this.#buffer.length * 2);
        bigger.set(this.#buffer);
        this.#buffer = bigger;
      }
      this.#start = 0;
      this.#end = kept;
    }
    const read = await this.#conn.read(this.#buffer.subarray(this.#end));
    if (read === null) return false;
    this.#end += read;
    return true;
  }

  /** Bytes up to the blank line ending a head (without it). */
  async head(): Promise<Uint8Array> {
    for (let from = this.#start;;) {
      const at = indexOf(this.#buffer, CRLF_CRLF, from, this.#end);
      if (at !== -1) {
        const head = this.#buffer.slice(this.#start, at);
        this.#start = at + 4;
        return head;
      }
      if (this.#end - this.#start > MAX_HEAD_BYTES) {
        throw new TypeError("the engine's answer has an oversized head");
      }
      from = Math.max(this.#start, this.#end - 3);
      const offset = from - this.#start;
      if (!await this.#fill()) throw new TypeError("the engine closed the connection");
      from = this.#start + offset;
    }
  }

  /** Everything until the connection ends. */
  async *untilClose(): AsyncGenerator<Uint8Array> {
    for (;;) {
      if (this.#end > this.#start) {
        yield this.#take(this.#end - this.#start);
      }
      if (!await this.#fill()) return;
    }
  }

  /** `length` bytes; fewer is an error. */
  async *exactly(length: number): AsyncGenerator<Uint8Array> {
    let left = length;
    while (left > 0) {
      if (this.#end === this.#start && !await this.#fill()) {
        throw new TypeError("the engine's answer ended before its content-length");
      }
      const piece = this.#take(Math.min(left, this.#end - this.#start));
      left -= piece.length;
      yield piece;
    }
  }

  /** The data of a chunked body, as many chunks at once as have arrived. */
  async *chunked(): AsyncGenerator<Uint8Array> {
    let left = 0; // bytes of the current chunk still to come
    for (;;) {
      const pieces: Uint8Array[] = [];
      let size = 0;
      // Everything whole in the buffer now.
      for (;;) {
        if (left > 0) {
          const n = Math.min(left, this.#end - this.#start);
          if (n === 0) break;
          pieces.push(this.#buffer.subarray(this.#start, this.#start + n));
          size += n;
          this.#start += n;
          left -= n;
          if (left > 0) break;
          left = -2; // the CRLF after the data
        }
        if (left < 0) {
          if (this.#end - this.#start < 2) break;
          if (this.#buffer[this.#start] !== 13 || this.#buffer[this.#start + 1] !== 10) {
            throw new TypeError("the engine's chunked answer is malformed");
          }
          this.#start += 2;
          left = 0;
        }
        const lineEnd = indexOf(this.#buffer, [13, 10], this.#start, this.#end);
        if (lineEnd === -1) {
          if (this.#end - this.#start > 1024) {
            throw new TypeError("the engine's chunked answer is malformed");
          }
          break;
        }
        const sizeText = LATIN1.decode(this.#buffer.subarray(this.#start, lineEnd)).split(";")[0]
          .trim();
        if (!/^[0-9a-fA-F]{1,8}$/.test(sizeText)) {
          throw new TypeError("the engine's chunked answer is malformed");
        }
        const chunkSize = parseInt(sizeText, 16);
        if (chunkSize === 0) {
          // The last chunk: trailers (none expected) up to a blank line.
          const trailerEnd = indexOf(this.#buffer, [13, 10], lineEnd + 2, this.#end);
          if (trailerEnd === -1) break;
          if (trailerEnd !== lineEnd + 2) {
            const end = indexOf(this.#buffer, CRLF_CRLF, lineEnd, this.#end);
            if (end === -1) break;
            this.#start = end + 4;
          } else this.#start = trailerEnd + 2;
          if (size > 0) yield join(pieces, size);
          return;
        }
        this.#start = lineEnd + 2;
        left = chunkSize;
      }
      if (size > 0) yield join(pieces, size);
      // Pieces were views of the buffer: yielded (copied) before it is refilled.
      if (!await this.#fill()) {
        throw new TypeError("the engine closed the connection in the middle of its answer");
      }
    }
  }

  #take(n: number): Uint8Array {
    const piece = this.#buffer.slice(this.#start, this.#start + n);
    this.#start += n;
    return piece;
  }
}

/** The pieces (views of one buffer) copied into one array. */
function join(pieces: Uint8Array[], size: number): Uint8Array {
  if (pieces.length === 1) return pieces[0].slice();
  const joined = new Uint8Array(size);
  let at = 0;
  for (const piece of pieces) {
    joined.set(piece, at);
    at += piece.length;
  }
  return joined;
}

function indexOf(buffer: Uint8Array, needle: readonly number[], from: number, to: number): number {
  const last = to - needle.length;
  outer: for (let i = from; i <= last; i++) {
    for (let j = 0; j < needle.length; j++) if (buffer[i + j] !== needle[j]) continue outer;
    return i;
  }
  return -1;
}
