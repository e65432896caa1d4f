/**
 * Buffered reads of one HTTP/1.1 connection: an answer's head, and its body
 * unframed (chunked, of a content-length, or up to the end of the
 * connection). One buffer serves the connection's whole life, so that bytes
 * read past one answer are there for the next, and a chunked body's framing
 * is undone in place: this is on the per-token path.
 *
 * A chunked body that trickles in (an engine sends a frame a token, a few
 * milliseconds apart) is read once a tick of the thread's read clock, not once
 * a frame: each read that wakes the thread costs more CPU (the event loop's
 * turn, the read, the promises of each layer above it) than the frame's own
 * work, and one tick wakes every such stream of the thread at once. See
 * {@linkcode ReadPacing} for when a body is paced, and what it costs.
 *
 * @module
 */

const LATIN1 = new TextDecoder("latin1");
const CRLF_CRLF = [13, 10, 13, 10];
const MAX_HEAD_BYTES = 64 * 1024;
const READ_BYTES = 16 * 1024;

/**
 * Milliseconds between the ticks of a thread's read clock: a fiftieth of a
 * second, under what a reader of streamed text notices, and several frames of
 * an engine fast enough for it to matter.
 */
export const READ_TICK_MS = 20;

let tick: Promise<void> | undefined;

/**
 * Resolves at the next tick of this thread's read clock: one timer, however
 * many streams wait for it. Ticks fall on multiples of
 * {@linkcode READ_TICK_MS} of the wall clock, the same instants in every
 * thread, so that the request workers' deltas reach the gateway close
 * together.
 */
export function readTick(): Promise<void> {
  return tick ??= new Promise((resolve) =>
    setTimeout(() => {
      tick = undefined;
      resolve();
    }, READ_TICK_MS - Date.now() % READ_TICK_MS)
  );
}

/**
 * When a chunked body is read once a tick: when its frames come faster than
 * half a tick apart, but not all at once. A body is paced once one of its
 * reads waited at least `trickleMs` but less than half of `tickMs` for its
 * bytes. A burst (a zero-latency engine's answer) never waits, and is read as
 * fast as it comes; an engine slower than the tick is read as each frame
 * comes, never later: a body stops being paced when a read waits half a tick
 * or more, or fills the buffer. A paced body waits for the next tick after
 * each read that emptied the socket: a frame that comes meanwhile is read up
 * to a tick late, with the others that came. The first `unpacedReads` reads
 * with data are never held back: the first token is what a user waits for.
 */
export interface ReadPacing {
  /**
   * Resolves at the next tick.
   * @default {readTick}
   */
  readonly tick?: () => Promise<void>;
  /**
   * The clock, in milliseconds.
   * @default {performance.now}
   */
  readonly now?: () => number;
  /**
   * Milliseconds between ticks.
   * @default {READ_TICK_MS}
   */
  readonly tickMs?: number;
  /**
   * A read that waited this long for its bytes (and less than half a tick)
   * marks its body as paced.
   * @default {1}
   */
  readonly trickleMs?: number;
  /**
   * Reads with data at the start of a body that are never held back.
   * @default {2}
   */
  readonly unpacedReads?: number;
}

/** What a {@linkcode SocketReader} reads from: a connection (`Deno.Conn`), or a test's stand-in. */
export interface Readable {
  /** Reads into `buffer`; the bytes read, or null at the end of the stream. */
  read(buffer: Uint8Array): Promise<number | null>;
}

/** Buffered reads of one connection. */
export class SocketReader {
  readonly #conn: Readable;
  #buffer = new Uint8Array(READ_BYTES);
  #start = 0;
  #end = 0;
  readonly #tick: () => Promise<void>;
  readonly #now: () => number;
  readonly #trickleMs: number;
  readonly #tickMs: number;
  readonly #unpacedReads: number;
  /** Whether the last read emptied the socket (it did not fill the buffer). */
  #drained = false;
  /** Milliseconds the last read waited for its bytes. */
  #waitedMs = 0;

  constructor(conn: Readable, pacing: ReadPacing = {}) {
    this.#conn = conn;
    this.#tick = pacing.tick ?? readTick;
    this.#now = pacing.now ?? (() => performance.now());
    this.#trickleMs = pacing.trickleMs ?? 1;
    this.#tickMs = pacing.tickMs ?? READ_TICK_MS;
    this.#unpacedReads = pacing.unpacedReads ?? 2;
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
    const space = this.#buffer.length - this.#end;
    const asked = this.#now();
    const read = await this.#conn.read(this.#buffer.subarray(this.#end));
    this.#waitedMs = this.#now() - asked;
    if (read === null) return false;
    this.#drained = read < space;
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
    let reads = 0; // reads that yielded data
    let paced = false;
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
      if (size > 0) {
        yield join(pieces, size);
        reads++;
      }
      if (paced && reads > this.#unpacedReads && this.#drained) await this.#tick();
      // Pieces were views of the buffer: yielded (copied) before it is refilled.
      if (!await this.#fill()) {
        throw new TypeError("the engine closed the connection in the middle of its answer");
      }
      if (!this.#drained || this.#waitedMs >= this.#tickMs / 2) paced = false;
      else if (this.#waitedMs >= this.#trickleMs) paced = true;
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
