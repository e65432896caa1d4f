/**
 * Buffered reads of one HTTP/1.1 connection: an answer's head, and its body
 * unframed (chunked, of a content-length, or up to the end of the
 * connection). One buffer serves the connection's whole life, so that bytes
 * read past one answer are there for the next, and a chunked body's framing
 * is undone in place: this is on the per-token path.
 *
 * @module
 */

const LATIN1 = new TextDecoder("latin1");
const CRLF_CRLF = [13, 10, 13, 10];
const MAX_HEAD_BYTES = 64 * 1024;
const READ_BYTES = 16 * 1024;

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

  constructor(conn: Readable) {
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
