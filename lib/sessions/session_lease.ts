/**
 * Per-session leases in the shared session store, for several instances: a
 * turn runs only while its instance holds the session's lease, so two
 * instances never run turns of one session at once. A lease expires unless
 * renewed, so a crashed instance holds a session for at most `ttlMs`.
 *
 * @module
 */

import { abortableSleep } from "../_util.ts";
import { commitUnlessBusy } from "./_util.ts";

interface Lease {
  /** `{instance}/{uuid}`: the instance and the turn holding it. */
  readonly holder: string;
  readonly until: number;
}

/** Options of {@linkcode SessionLeases}. */
export interface SessionLeasesOptions {
  /** This instance's id, named in the leases it holds. */
  readonly owner: string;
  /**
   * Milliseconds a lease lasts unless renewed (renewed every third of it).
   * @default {10000}
   */
  readonly ttlMs?: number;
  /**
   * Milliseconds between tries while another instance holds the lease.
   * @default {25}
   */
  readonly pollMs?: number;
}

/** Leases on sessions, kept in a Deno KV shared by the instances. */
export class SessionLeases {
  readonly #kv: Deno.Kv;
  readonly #owner: string;
  readonly #ttlMs: number;
  readonly #pollMs: number;

  private constructor(kv: Deno.Kv, options: SessionLeasesOptions) {
    this.#kv = kv;
    this.#owner = options.owner;
    this.#ttlMs = options.ttlMs ?? 10_000;
    this.#pollMs = options.pollMs ?? 25;
  }

  /** Opens the leases kept in the store at `path`. */
  static async open(path: string, options: SessionLeasesOptions): Promise<SessionLeases> {
    return new SessionLeases(await Deno.openKv(path), options);
  }

  /**
   * Waits until this instance holds the session's lease and returns its
   * release; the lease is renewed until then.
   *
   * @throws the reason `signal` aborts with.
   */
  async acquire(project: string, sessionId: string, signal: AbortSignal): Promise<() => void> {
    const key = ["lease", project, sessionId];
    // One holder per acquisition, not per instance: a late release of this turn's lease must
    // not free the lease of this instance's next turn of the session.
    const holder = `${this.#owner}/${crypto.randomUUID()}`;
    while (!(await this.#take(key, holder))) {
      await abortableSleep(this.#pollMs * (0.5 + Math.random()), signal);
    }
    let renewing: Promise<unknown> = Promise.resolve();
    const renewal = setInterval(() => {
      renewing = this.#take(key, holder).catch(() => {});
    }, this.#ttlMs / 3);
    return () => {
      clearInterval(renewal);
      // After a renewal still on its way, or it would take the lease again.
      renewing.then(() => this.#release(key, holder)).catch(() => {});
    };
  }

  close(): void {
    this.#kv.close();
  }

  /** Takes or renews the lease if it is free, expired or `holder`'s. */
  async #take(key: Deno.KvKey, holder: string): Promise<boolean> {
    const now = Date.now();
    const entry = await this.#kv.get<Lease>(key);
    const lease = entry.value;
    if (lease && lease.holder !== holder && lease.until > now) return false;
    const result = await commitUnlessBusy(
      this.#kv.atomic()
        .check(entry)
        .set(key, { holder, until: now + this.#ttlMs }, { expireIn: this.#ttlMs }),
    );
    return result !== "busy" && result.ok;
  }

  async #release(key: Deno.KvKey, holder: string): Promise<void> {
    for (let attempt = 0; attempt < 20; attempt++) {
      const entry = await this.#kv.get<Lease>(key);
      if (entry.value?.holder !== holder) return;
      const result = await commitUnlessBusy(this.#kv.atomic().check(entry).delete(key));
      if (result !== "busy" && result.ok) return;
      await abortableSleep(1 + Math.random() * 10);
    }
  }
}
