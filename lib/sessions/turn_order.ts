/**
 * The order of a session's turns across instances that share one session
 * store (a share group, whose broker hands consecutive requests to different
 * instances). Each request leaves a ticket in the store stamped with the time
 * it arrived; its turn may go when no earlier ticket of the session is held
 * by another live instance, and no later one has already gone there. A turn
 * goes in one atomic write, checked against the session's line: every ticket
 * and every go changes the line, so a ticket that reached the store after
 * the look, or another instance's go, makes the write fail and the turn look
 * again. So two instances never run turns of one session at once, turns run
 * in the order they reached the instances, and a crashed instance, whose
 * heartbeat stops, holds a session up for at most `instanceTimeoutMs`.
 *
 * A ticket takes a moment to reach the store, so a turn first waits
 * `windowMs` from its arrival: time for a turn that arrived a little earlier
 * at another instance to show up.
 *
 * @module
 */

import { abortableSleep } from "../_util.ts";
import { commitWhenFree, openKv } from "./_util.ts";
import { sessionKey } from "./session_key.ts";

/** A ticket as stored: who holds it, and whether its turn has gone (it runs, or is queued to). */
interface Holder {
  readonly instance: string;
  readonly running: boolean;
}

/** Options of {@linkcode TurnOrder}. */
export interface TurnOrderOptions {
  /** This instance's name (its MQTT client id); a random suffix tells its runs apart. */
  readonly instance: string;
  /**
   * Milliseconds a turn waits from its arrival for earlier turns that arrived
   * at other instances to reach the store.
   * @default {50}
   */
  readonly windowMs?: number;
  /**
   * Milliseconds without a heartbeat after which an instance counts as gone
   * (the heartbeat is written every third of it).
   * @default {10000}
   */
  readonly instanceTimeoutMs?: number;
  /**
   * Milliseconds between looks while a turn of the session runs on another instance.
   * @default {25}
   */
  readonly pollMs?: number;
  /**
   * Milliseconds a ticket is kept at most (a turn never takes as long).
   * @default {3600000}
   */
  readonly keepMs?: number;
  /**
   * The clock, in milliseconds since the epoch (arrivals and heartbeats are
   * compared across instances); injected by tests.
   * @default {Date.now}
   */
  readonly now?: () => number;
  /**
   * Waits `ms` or until `signal` aborts (rejecting with its reason); injected by tests.
   * @default {abortableSleep}
   */
  readonly sleep?: (ms: number, signal: AbortSignal) => Promise<void>;
}

/** A request's place in its session's line. */
export class TurnTicket {
  /** `["turn", project, sessionId, arrival ms, instance, number]`: sorts by arrival. */
  readonly key: readonly [string, string, string, number, string, number];
  readonly #order: TurnOrder;
  #finished: Promise<void> | undefined;

  constructor(order: TurnOrder, key: TurnTicket["key"]) {
    this.#order = order;
    this.key = key;
  }

  /**
   * Resolves when the session's earlier turns on other instances are done
   * (this instance's own run first anyway: its scheduler keeps their order),
   * with the ticket marked as gone: a ticket that reaches the store later
   * waits for this turn.
   *
   * @throws the reason `signal` aborts with.
   */
  turn(signal: AbortSignal): Promise<void> {
    return this.#order.waitFor(this, signal);
  }

  /** Lets the next turn go, whether this one ran or was given up; once is enough. */
  finish(): Promise<void> {
    return this.#finished ??= this.#order.finish(this);
  }
}

/** Tickets and heartbeats, kept in a Deno KV shared by the instances. */
export class TurnOrder {
  readonly #kv: Deno.Kv;
  readonly #instance: string;
  readonly #windowMs: number;
  readonly #timeoutMs: number;
  readonly #pollMs: number;
  readonly #keepMs: number;
  readonly #now: () => number;
  readonly #sleep: (ms: number, signal: AbortSignal) => Promise<void>;
  /** Waits for turns here, per session: ended one after another, in arrival order. */
  readonly #waiting = new Map<string, Promise<unknown>>();
  #issued = 0;
  #heartbeat: ReturnType<typeof setInterval> | undefined;

  private constructor(kv: Deno.Kv, options: TurnOrderOptions) {
    this.#kv = kv;
    this.#instance = `${options.instance}/${crypto.randomUUID()}`;
    this.#windowMs = options.windowMs ?? 50;
    this.#timeoutMs = options.instanceTimeoutMs ?? 10_000;
    this.#pollMs = options.pollMs ?? 25;
    this.#keepMs = options.keepMs ?? 3_600_000;
    this.#now = options.now ?? Date.now;
    this.#sleep = options.sleep ?? abortableSleep;
  }

  /** Opens the tickets kept in the store at `path` and starts this instance's heartbeat. */
  static async open(path: string, options: TurnOrderOptions): Promise<TurnOrder> {
    const order = new TurnOrder(await openKv(path), options);
    await order.#beat();
    order.#heartbeat = setInterval(() => order.#beat().catch(() => {}), order.#timeoutMs / 3);
    return order;
  }

  /**
   * Leaves a ticket for a request of the session that arrived at `arrivedAt`
   * (milliseconds since the epoch).
   */
  async take(project: string, sessionId: string, arrivedAt: number): Promise<TurnTicket> {
    const ticket = new TurnTicket(this, [
      "turn",
      project,
      sessionId,
      arrivedAt,
      this.#instance,
      this.#issued++,
    ]);
    const holder: Holder = { instance: this.#instance, running: false };
    await this.#kv.atomic()
      .set(ticket.key, holder, { expireIn: this.#keepMs })
      .set(lineKey(project, sessionId), ticket.key, { expireIn: this.#keepMs })
      .commit();
    return ticket;
  }

  /** See {@linkcode TurnTicket.turn}. */
  waitFor(ticket: TurnTicket, signal: AbortSignal): Promise<void> {
    // After this instance's earlier tickets of the session: they reach the scheduler first.
    const [, project, sessionId] = ticket.key;
    const session = sessionKey(project, sessionId);
    const previous = this.#waiting.get(session);
    const waited = untilSettled(previous, signal).then(() => this.#waitForOthers(ticket, signal));
    const tail = Promise.allSettled([previous, waited]);
    this.#waiting.set(session, tail);
    tail.then(() => {
      if (this.#waiting.get(session) === tail) this.#waiting.delete(session);
    });
    return waited;
  }

  /** See {@linkcode TurnTicket.finish}. */
  async finish(ticket: TurnTicket): Promise<void> {
    await this.#kv.delete(ticket.key);
  }

  close(): void {
    clearInterval(this.#heartbeat);
    this.#kv.close();
  }

  async #waitForOthers(ticket: TurnTicket, signal: AbortSignal): Promise<void> {
    const [, project, sessionId, arrivedAt] = ticket.key;
    const settled = arrivedAt + this.#windowMs - this.#now();
    if (settled > 0) await this.#sleep(settled, signal);
    const alive = new Map<string, Promise<boolean>>();
    const line = lineKey(project, sessionId);
    for (;;) {
      // Read before the tickets: whatever reaches the store after this changes it.
      const looked = await this.#kv.get(line);
      let blocked = false;
      for await (const entry of this.#kv.list<Holder>({ prefix: ["turn", project, sessionId] })) {
        const { instance, running } = entry.value;
        if (instance === this.#instance) continue;
        if (!running && !before(entry.key, ticket.key)) continue;
        if (!alive.has(instance)) alive.set(instance, this.#alive(instance));
        if (await alive.get(instance)) blocked = true;
        else await this.#kv.delete(entry.key); // its instance is gone
      }
      if (!blocked) {
        const holder: Holder = { instance: this.#instance, running: true };
        // A checked write: under contention SQLite refuses it at once, and it is tried again.
        const go = await commitWhenFree(
          this.#kv.atomic()
            .check(looked)
            .set(ticket.key, holder, { expireIn: this.#keepMs })
            .set(line, ticket.key, { expireIn: this.#keepMs }),
        );
        if (go.ok) return;
      }
      alive.clear();
      // Not blocked but the go failed: a ticket or a go came after the look; look again at once.
      if (blocked) await this.#sleep(this.#pollMs * (0.5 + Math.random()), signal);
    }
  }

  async #alive(instance: string): Promise<boolean> {
    const beat = await this.#kv.get<number>(["turn_instance", instance]);
    return (beat.value ?? 0) > this.#now();
  }

  /** Writes this instance's heartbeat: alive until the time it names. */
  async #beat(): Promise<void> {
    await this.#kv.set(["turn_instance", this.#instance], this.#now() + this.#timeoutMs, {
      expireIn: 2 * this.#timeoutMs,
    });
  }
}

/** The key every ticket and every go of a session's turns writes. */
function lineKey(project: string, sessionId: string): Deno.KvKey {
  return ["turn_line", project, sessionId];
}

/** Whether ticket key `a` sorts before `b`: by arrival, then instance, then number. */
function before(a: Deno.KvKey, b: TurnTicket["key"]): boolean {
  const [, , , arrivedAt, instance, number] = a as TurnTicket["key"];
  if (arrivedAt !== b[3]) return arrivedAt < b[3];
  if (instance !== b[4]) return instance < b[4];
  return number < b[5];
}

/** Resolves when `promise` settles; rejects with the reason if `signal` aborts first. */
function untilSettled(promise: Promise<unknown> | undefined, signal: AbortSignal): Promise<void> {
  if (!promise) return Promise.resolve();
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(signal.reason);
    const onAbort = () => reject(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    const settled = () => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    };
    promise.then(settled, settled);
  });
}
