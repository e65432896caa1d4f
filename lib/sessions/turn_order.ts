/**
 * The order of a session's turns across instances that share one session
 * store (a share group). Each request takes a ticket, the session's next
 * number, as it arrives, whichever instance it lands on; its turn may start
 * when every earlier ticket is finished, abandoned, held by this instance
 * (whose scheduler already runs a session's turns in arrival order), or held
 * by an instance whose heartbeat has stopped (it crashed). So two instances
 * never run turns of one session at once, turns run in the order they
 * reached the instances, and a crashed instance holds a session up for at
 * most `instanceTimeoutMs`.
 *
 * @module
 */

import { abortableSleep } from "../_util.ts";
import { commitChecked } from "./_util.ts";

/** A session's line: tickets handed out, and the last one finished or skipped. */
interface Line {
  readonly issued: number;
  readonly done: number;
}

/** Options of {@linkcode TurnOrder}. */
export interface TurnOrderOptions {
  /** This instance's name (its MQTT client id); a random suffix tells its runs apart. */
  readonly instance: string;
  /**
   * Milliseconds without a heartbeat after which an instance counts as gone
   * (the heartbeat is written every third of it).
   * @default {10000}
   */
  readonly instanceTimeoutMs?: number;
  /**
   * Milliseconds between looks while an earlier turn runs on another instance.
   * @default {25}
   */
  readonly pollMs?: number;
  /**
   * Milliseconds a session's line is kept after its last ticket.
   * @default {3600000}
   */
  readonly keepMs?: number;
}

/** A request's place in its session's line. */
export class TurnTicket {
  readonly project: string;
  readonly sessionId: string;
  readonly number: number;
  readonly #order: TurnOrder;
  #finished: Promise<void> | undefined;

  constructor(order: TurnOrder, project: string, sessionId: string, number: number) {
    this.#order = order;
    this.project = project;
    this.sessionId = sessionId;
    this.number = number;
  }

  /**
   * Resolves when every earlier turn of the session is finished or belongs to
   * this instance.
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
  readonly #timeoutMs: number;
  readonly #pollMs: number;
  readonly #keepMs: number;
  /** Tickets being taken here, per session: taken one after another, in arrival order. */
  readonly #taking = new Map<string, Promise<unknown>>();
  /** Waits for turns here, per session: ended one after another, in ticket order. */
  readonly #waiting = new Map<string, Promise<unknown>>();
  #heartbeat: ReturnType<typeof setInterval> | undefined;

  private constructor(kv: Deno.Kv, options: TurnOrderOptions) {
    this.#kv = kv;
    this.#instance = `${options.instance}/${crypto.randomUUID()}`;
    this.#timeoutMs = options.instanceTimeoutMs ?? 10_000;
    this.#pollMs = options.pollMs ?? 25;
    this.#keepMs = options.keepMs ?? 3_600_000;
  }

  /** Opens the line records kept in the store at `path` and starts this instance's heartbeat. */
  static async open(path: string, options: TurnOrderOptions): Promise<TurnOrder> {
    const order = new TurnOrder(await Deno.openKv(path), options);
    await order.#beat();
    order.#heartbeat = setInterval(() => order.#beat().catch(() => {}), order.#timeoutMs / 3);
    return order;
  }

  /** Takes the session's next ticket, after any this instance is already taking for it. */
  take(project: string, sessionId: string): Promise<TurnTicket> {
    const session = { project, sessionId };
    return this.#chain(this.#taking, session, () => this.#issue(project, sessionId));
  }

  /** See {@linkcode TurnTicket.turn}. */
  waitFor(ticket: TurnTicket, signal: AbortSignal): Promise<void> {
    // After this instance's earlier tickets of the session: they reach the scheduler first.
    return this.#chain(this.#waiting, ticket, () => this.#waitForEarlier(ticket, signal), signal);
  }

  /** See {@linkcode TurnTicket.finish}. */
  async finish(ticket: TurnTicket): Promise<void> {
    const lineKey = this.#lineKey(ticket);
    const ticketKey = [...this.#ticketsKey(ticket), ticket.number];
    await commitChecked(this.#kv, `the line of ${sessionKey(ticket)}`, async (op) => {
      const line = await this.#kv.get<Line>(lineKey);
      op.check(line).delete(ticketKey);
      // A ticket given up before its turn only leaves the line; the turn after it skips it.
      if (line.value?.done === ticket.number - 1) {
        op.set(lineKey, { ...line.value, done: ticket.number }, { expireIn: this.#keepMs });
      }
      return true;
    });
  }

  close(): void {
    clearInterval(this.#heartbeat);
    this.#kv.close();
  }

  /**
   * Runs `step` once the session's previous step in `steps` settled (or
   * `signal` aborted); the next step waits for both.
   */
  #chain<T>(
    steps: Map<string, Promise<unknown>>,
    session: { project: string; sessionId: string },
    step: () => Promise<T>,
    signal?: AbortSignal,
  ): Promise<T> {
    const key = sessionKey(session);
    const previous = steps.get(key);
    const result = untilSettled(previous, signal).then(step);
    const tail = Promise.allSettled([previous, result]);
    steps.set(key, tail);
    tail.then(() => {
      if (steps.get(key) === tail) steps.delete(key);
    });
    return result;
  }

  /**
   * Waits while a ticket before `ticket` is held by another live instance,
   * skipping the leading ones nobody holds any more.
   */
  async #waitForEarlier(ticket: TurnTicket, signal: AbortSignal): Promise<void> {
    const lineKey = this.#lineKey(ticket);
    for (;;) {
      signal.throwIfAborted();
      const line = await this.#kv.get<Line>(lineKey);
      // No line: it expired, so nothing before this ticket is waiting.
      const done = line.value?.done ?? ticket.number - 1;
      let gone = done;
      let blocked = false;
      for (let number = done + 1; number < ticket.number && !blocked; number++) {
        const holder = await this.#holder(ticket, number);
        if (holder === "gone" && gone === number - 1) gone = number;
        blocked = holder === "there";
      }
      if (gone > done) {
        await commitChecked(this.#kv, `the line of ${sessionKey(ticket)}`, async (op) => {
          const current = await this.#kv.get<Line>(lineKey);
          if (!current.value || current.value.done >= gone) return false;
          op.check(current)
            .set(lineKey, { ...current.value, done: gone }, { expireIn: this.#keepMs });
          return true;
        });
      }
      if (!blocked) return;
      await abortableSleep(this.#pollMs * (0.5 + Math.random()), signal);
    }
  }

  async #issue(project: string, sessionId: string): Promise<TurnTicket> {
    const lineKey = ["turn_line", project, sessionId];
    let number = 0;
    await commitChecked(
      this.#kv,
      `the line of ${sessionKey({ project, sessionId })}`,
      async (op) => {
        const line = await this.#kv.get<Line>(lineKey);
        const { issued, done } = line.value ?? { issued: 0, done: 0 };
        number = issued + 1;
        op.check(line)
          .set(lineKey, { issued: number, done }, { expireIn: this.#keepMs })
          .set(["turn_ticket", project, sessionId, number], this.#instance, {
            expireIn: this.#keepMs,
          });
        return true;
      },
    );
    return new TurnTicket(this, project, sessionId, number);
  }

  /** Who holds ticket `number` of the session: this instance, another live one, or nobody. */
  async #holder(ticket: TurnTicket, number: number): Promise<"here" | "there" | "gone"> {
    const holder = await this.#kv.get<string>([...this.#ticketsKey(ticket), number]);
    if (holder.value === null) return "gone";
    if (holder.value === this.#instance) return "here";
    const beat = await this.#kv.get<number>(["turn_instance", holder.value]);
    return (beat.value ?? 0) > Date.now() ? "there" : "gone";
  }

  /** Writes this instance's heartbeat: alive until the time it names. */
  async #beat(): Promise<void> {
    await this.#kv.set(["turn_instance", this.#instance], Date.now() + this.#timeoutMs, {
      expireIn: 2 * this.#timeoutMs,
    });
  }

  #lineKey(ticket: TurnTicket): Deno.KvKey {
    return ["turn_line", ticket.project, ticket.sessionId];
  }

  #ticketsKey(ticket: TurnTicket): Deno.KvKey {
    return ["turn_ticket", ticket.project, ticket.sessionId];
  }
}

function sessionKey(session: { project: string; sessionId: string }): string {
  return `${session.project}/${session.sessionId}`;
}

/** Resolves when `promise` settles; rejects with the reason if `signal` aborts first. */
function untilSettled(promise: Promise<unknown> | undefined, signal?: AbortSignal): Promise<void> {
  if (!promise) return Promise.resolve();
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const onAbort = () => reject(signal!.reason);
    signal?.addEventListener("abort", onAbort, { once: true });
    const settled = () => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    };
    promise.then(settled, settled);
  });
}
