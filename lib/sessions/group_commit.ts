/**
 * Group commit: turns that finish while a commit is in flight are committed
 * together in the next atomic operation. Deno KV pays per transaction, not per
 * key (one SQLite transaction and one disk sync each), so a write of eight
 * turns costs little more than a write of one. The first write goes at once:
 * a connection runs its operations one at a time anyway, so waiting in the
 * queue adds no latency.
 *
 * Each write keeps its own checks, and its promise resolves only once its own
 * records are durable (or its check failed). A batch whose check fails, or
 * that throws (a value too large, a full disk), is tried again write by write
 * in queue order, so only the write at fault sees its failure. Two writes that
 * check the same key never share a batch: a batch's checks all run before its
 * mutations, so the second would pass a check the first makes stale.
 *
 * Only for a local store: a remote one (`--kv-url`, a denokv server) takes at
 * most 10 checks an operation and runs several operations at once, so there
 * each write is committed on its own, at once (`grouped: false`).
 *
 * Private to `lib/sessions/`.
 *
 * @module
 */

import { commitWhenFree } from "./_util.ts";
import { SessionStoreError } from "./session_store_error.ts";

/** Deno KV's limits per atomic operation (`Deno.openKv` on a local file). */
const MAX_CHECKS = 100;
const MAX_MUTATIONS = 1000;
/** Of the mutations, in bytes, as Deno counts them: each written key twice, each checked key once. */
const MAX_MUTATION_BYTES = 800 * 1024;
/** Of the keys checked and written, in bytes. */
const MAX_KEY_BYTES = 80 * 1024;

/** A key's size when encoded, from above: 3 bytes per UTF-16 unit of its strings. */
function keyBytes(key: Deno.KvKey): number {
  let bytes = 0;
  for (const part of key) {
    if (typeof part === "string") bytes += 3 * part.length + 2;
    else if (part instanceof Uint8Array) bytes += 2 * part.length + 2;
    else bytes += 10;
  }
  return bytes;
}

/** A stable text for a key, to tell whether two writes check the same one. */
function keyId(key: Deno.KvKey): string {
  return key.map((part) =>
    part instanceof Uint8Array ? `b${part.join(",")}` : `${typeof part}:${String(part)}`
  ).join("\u0000");
}

/** One atomic write's checks and sets, kept until it is committed with others. */
export class PendingWrite {
  readonly #checks: Deno.AtomicCheck[] = [];
  readonly #sets: { key: Deno.KvKey; value: unknown; expireIn?: number }[] = [];
  /** Estimated size of its mutations as Deno counts it (see `MAX_MUTATION_BYTES`), in bytes. */
  #bytes = 0;
  /** Estimated size of its keys (checked and written), in bytes. */
  #keyBytes = 0;

  /** Adds a versionstamp check. */
  check(check: Deno.AtomicCheck): this {
    this.#checks.push(check);
    const size = keyBytes(check.key);
    this.#keyBytes += size;
    this.#bytes += size;
    return this;
  }

  /** Adds a set of `key` to `value`, whose serialized size is at most `valueBytes`. */
  set(key: Deno.KvKey, value: unknown, valueBytes: number, expireIn?: number): this {
    this.#sets.push({ key, value, expireIn });
    const size = keyBytes(key);
    this.#keyBytes += size;
    this.#bytes += 2 * size + valueBytes;
    return this;
  }

  /** Adds the checks and sets to `op`. */
  addTo(op: Deno.AtomicOperation): Deno.AtomicOperation {
    op.check(...this.#checks);
    for (const { key, value, expireIn } of this.#sets) op.set(key, value, { expireIn });
    return op;
  }

  /** Its size against each of Deno KV's limits. */
  get size(): { checks: number; mutations: number; bytes: number; keyBytes: number } {
    return {
      checks: this.#checks.length,
      mutations: this.#sets.length,
      bytes: this.#bytes,
      keyBytes: this.#keyBytes,
    };
  }

  /** The keys it checks. */
  get checkedKeys(): string[] {
    return this.#checks.map((check) => keyId(check.key));
  }
}

interface Queued {
  readonly write: PendingWrite;
  readonly done: PromiseWithResolvers<Deno.KvCommitResult | Deno.KvCommitError>;
}

/** The atomic writes of one connection, committed in groups. */
export class GroupCommit {
  readonly #kv: Pick<Deno.Kv, "atomic">;
  readonly #grouped: boolean;
  #queue: Queued[] = [];
  #running = false;

  /**
   * @param kv The connection (anything with `atomic()`, so tests can count operations).
   * @param options.grouped Whether writes are grouped; false commits each on its own, at once
   *   (a remote store). @default {true}
   */
  constructor(kv: Pick<Deno.Kv, "atomic">, options: { readonly grouped?: boolean } = {}) {
    this.#kv = kv;
    this.#grouped = options.grouped ?? true;
  }

  /**
   * Commits `write`, with the writes queued meanwhile; waits while another
   * connection holds the store's lock, as {@linkcode commitWhenFree}. Resolves
   * once `write` is durable, or not `ok` when one of its checks failed.
   *
   * @throws what committing `write` alone throws (e.g. a full disk, a value too
   *   large), or {@linkcode SessionStoreError} `busy` when the store stayed locked.
   */
  commit(write: PendingWrite): Promise<Deno.KvCommitResult | Deno.KvCommitError> {
    if (!this.#grouped) return commitWhenFree(write.addTo(this.#kv.atomic()));
    const done = Promise.withResolvers<Deno.KvCommitResult | Deno.KvCommitError>();
    this.#queue.push({ write, done });
    if (!this.#running) this.#run();
    return done.promise;
  }

  async #run(): Promise<void> {
    this.#running = true;
    while (this.#queue.length > 0) {
      const batch = this.#queue.splice(0, this.#fitting());
      let result: Deno.KvCommitResult | Deno.KvCommitError;
      try {
        const op = this.#kv.atomic();
        for (const { write } of batch) write.addTo(op);
        result = await commitWhenFree(op);
      } catch (error) {
        // A write alone has its own error. A store that stayed locked (`SessionStoreError`
        // `busy`) is every write's: each would have waited as long on its own.
        if (batch.length === 1 || isBusy(error)) {
          for (const { done } of batch) done.reject(error);
          continue;
        }
        await this.#oneByOne(batch);
        continue;
      }
      if (result.ok || batch.length === 1) {
        for (const { done } of batch) done.resolve(result);
        continue;
      }
      await this.#oneByOne(batch);
    }
    this.#running = false;
  }

  /** How many writes at the head of the queue fit one atomic operation (at least one). */
  #fitting(): number {
    const total = { checks: 0, mutations: 0, bytes: 0, keyBytes: 0 };
    const checked = new Set<string>();
    let n = 0;
    for (; n < this.#queue.length; n++) {
      const { write } = this.#queue[n];
      const size = write.size;
      const keys = write.checkedKeys;
      if (
        n > 0 && (
          total.checks + size.checks > MAX_CHECKS ||
          total.mutations + size.mutations > MAX_MUTATIONS ||
          total.bytes + size.bytes > MAX_MUTATION_BYTES ||
          total.keyBytes + size.keyBytes > MAX_KEY_BYTES ||
          keys.some((key) => checked.has(key))
        )
      ) break;
      total.checks += size.checks;
      total.mutations += size.mutations;
      total.bytes += size.bytes;
      total.keyBytes += size.keyBytes;
      for (const key of keys) checked.add(key);
    }
    return n;
  }

  /** Commits each write of a failed batch alone, in order, each with its own outcome. */
  async #oneByOne(batch: Queued[]): Promise<void> {
    let locked: SessionStoreError | undefined;
    for (const { write, done } of batch) {
      // Once the store stayed locked for one, the rest would each wait as long again.
      if (locked) {
        done.reject(locked);
        continue;
      }
      try {
        done.resolve(await commitWhenFree(write.addTo(this.#kv.atomic())));
      } catch (error) {
        if (isBusy(error)) locked = error;
        done.reject(error);
      }
    }
  }
}

/** Whether `error` says the store stayed locked (every write's trouble, not one write's). */
function isBusy(error: unknown): error is SessionStoreError {
  return error instanceof SessionStoreError && error.code === "busy";
}
