/**
 * What the service can see of messages the broker drops: mosquitto counts
 * the messages it dropped because a client's queue was full
 * (`max_queued_messages`, `max_queued_bytes`, for connected clients too) on
 * `$SYS/broker/publish/messages/dropped`, every `sys_interval`. Requests to
 * the service are among them when a burst comes faster than it reads; the
 * broker tells no one else, so the count's rises are logged. Brokers without
 * that topic (or an ACL that hides it) send nothing, and nothing is logged.
 *
 * @module
 */

import { logger } from "../log.ts";

/** The topic of mosquitto's count of dropped messages. */
export const DROPPED_TOPIC = "$SYS/broker/publish/messages/dropped";

const log = logger("service");

/** Logs each rise of the broker's count of dropped messages. */
export class BrokerDrops {
  #last: number | undefined;

  /** The count, as the broker published it; returns how many more were dropped. */
  note(payload: Uint8Array): number {
    const count = Number(new TextDecoder().decode(payload));
    if (!Number.isFinite(count)) return 0;
    const rise = this.#last === undefined || count < this.#last ? 0 : count - this.#last;
    this.#last = count;
    if (rise > 0) {
      log.warn(
        "The broker dropped {rise} messages (its total: {count}) because a client's queue was " +
          "full; requests to this service may be among them: raise the broker's " +
          "max_queued_messages (it counts what waits for connected clients too)",
        { rise, count },
      );
    }
    return rise;
  }
}
