/**
 * The shared ledger of session → home engine, for several instances in an
 * MQTT share group (which hands each turn to any of them): in the Deno KV
 * store the instances already share, one key per session,
 * `["route", project, sessionId]` → the engine's id, expiring with the
 * session (`--session-ttl`).
 *
 * The router's rule alone (cost, ties broken by rendezvous hashing) agrees
 * only on what every instance sees; each sees only its own turns in flight, so
 * under load two instances could send one session to two engines. Here, the
 * instance running a turn reads the session's home, the router takes it
 * ({@linkcode Router.adopt}), and a decision that changes it is written back:
 * one read per turn, one write per session placed or moved. A read or write
 * that fails leaves the router on its own rule, which is still right under
 * light load.
 *
 * @module
 */

import type { RouteDecision, Router, TurnToRoute } from "./router.ts";

/** Options of {@linkcode RouteLedger}. */
export interface RouteLedgerOptions {
  /**
   * How long a session's home is remembered after its last change, in milliseconds (the
   * sessions' TTL, so that a session's route expires with its history).
   * @default {604800000}
   */
  readonly ttlMs?: number;
}

/** The shared session → home engine ledger; see the module doc. */
export class RouteLedger {
  readonly #kv: Deno.Kv;
  readonly #ttlMs: number;

  constructor(kv: Deno.Kv, options: RouteLedgerOptions = {}) {
    this.#kv = kv;
    this.#ttlMs = options.ttlMs ?? 7 * 24 * 3600_000;
  }

  /** The session's home as recorded by any instance. */
  async home(project: string, sessionId: string): Promise<string | undefined> {
    const entry = await this.#kv.get<string>(["route", project, sessionId]);
    return entry.value ?? undefined;
  }

  /** Records the session's home. */
  async record(project: string, sessionId: string, engine: string): Promise<void> {
    await this.#kv.set(["route", project, sessionId], engine, { expireIn: this.#ttlMs });
  }

  /** Forgets the session's home (the session was deleted, or its history cleared). */
  async forget(project: string, sessionId: string): Promise<void> {
    await this.#kv.delete(["route", project, sessionId]);
  }

  /**
   * Routes a turn with the home every instance agrees on: reads it, lets `router` adopt it,
   * routes, and records the decision when it changes the home. The store failing falls back to
   * the router's own rule.
   */
  async route(
    router: Router,
    turn: TurnToRoute,
    exclude?: ReadonlySet<string>,
  ): Promise<RouteDecision | undefined> {
    const slash = turn.key.indexOf("/");
    const project = turn.key.slice(0, slash);
    const sessionId = turn.key.slice(slash + 1);
    const recorded = await this.home(project, sessionId).catch(() => undefined);
    if (recorded !== undefined) router.adopt(turn.key, recorded);
    const decision = router.route(turn, exclude);
    if (decision && decision.engine !== recorded) {
      await this.record(project, sessionId, decision.engine).catch(() => {});
    }
    return decision;
  }
}
