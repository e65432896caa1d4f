/**
 * Write counters shared by the threads of one process, for session stores
 * that are the only writers of their sessions (one instance on its own data
 * directory). Every write of a session bumps its counter after the write; a
 * store that remembers a session with the counter it saw may skip reading it
 * again while the counter stays the same. Sessions share counters by hash: a
 * collision costs one needless read, never a stale one.
 *
 * @module
 */

const BUCKETS = 1 << 16;

/** Per-session write counters in shared memory. */
export class WriteGenerations {
  readonly #counters: Int32Array;

  private constructor(buffer: SharedArrayBuffer) {
    this.#counters = new Int32Array(buffer);
  }

  /** New counters, all zero. */
  static create(): WriteGenerations {
    return new WriteGenerations(new SharedArrayBuffer(BUCKETS * Int32Array.BYTES_PER_ELEMENT));
  }

  /** The counters of `buffer` (another thread's {@linkcode WriteGenerations.buffer}). */
  static from(buffer: SharedArrayBuffer): WriteGenerations {
    return new WriteGenerations(buffer);
  }

  /** The shared memory, to hand to a worker. */
  get buffer(): SharedArrayBuffer {
    return this.#counters.buffer as SharedArrayBuffer;
  }

  /** The session's counter now. */
  current(project: string, sessionId: string): number {
    return Atomics.load(this.#counters, bucket(project, sessionId));
  }

  /** Counts a write of the session that has completed; returns the new counter. */
  bump(project: string, sessionId: string): number {
    return Atomics.add(this.#counters, bucket(project, sessionId), 1) + 1;
  }
}

function bucket(project: string, sessionId: string): number {
  let hash = 0x811c9dc5;
  for (const text of [project, sessionId]) {
    for (let i = 0; i < text.length; i++) hash = Math.imul(hash ^ text.charCodeAt(i), 0x01000193);
    hash = Math.imul(hash ^ 0x2f, 0x01000193);
  }
  return (hash >>> 0) % BUCKETS;
}
