/**
 * The subscriptions of the service's persistent MQTT session across runs.
 * The broker keeps a session's subscriptions (that is what lets it queue the
 * requests sent while the service is down); a run with other projects or
 * options would inherit the previous run's, and answer topics it does not
 * serve, or a request twice through overlapping filters. So each run
 * records its set in the data folder, and the next one unsubscribes what it
 * does not have itself.
 *
 * @module
 */

import { join } from "node:path";
import { logger } from "../log.ts";

/** Where and how the subscriptions are replaced. */
export interface ReplaceOptions {
  readonly dataDir: string;
  /** The broker's URL and our client id: a record of another session is not ours. */
  readonly broker: string;
  readonly clientId: string;
  /** Whether the broker kept a session for us (else it holds no subscription of ours). */
  readonly sessionPresent: boolean;
  /** This run's filters, already subscribed. */
  readonly current: readonly string[];
  /** Filters an earlier run may have had that would overlap this run's, recorded or not. */
  readonly overlapping: readonly string[];
  readonly unsubscribe: (filters: string[]) => Promise<void>;
}

const log = logger("service");

/** The file a run's subscriptions are recorded in. */
export function subscriptionsFile(dataDir: string): string {
  return join(dataDir, "mqtt_subscriptions.json");
}

/**
 * Unsubscribes what an earlier run left in our session and this run does not
 * have, then records this run's set. Returns the filters it unsubscribed.
 */
export async function replaceSubscriptions(options: ReplaceOptions): Promise<string[]> {
  const file = subscriptionsFile(options.dataDir);
  const current = new Set(options.current);
  let stale: string[] = [];
  if (options.sessionPresent) {
    const recorded = (await readRecord(file, options.broker, options.clientId))
      .filter((filter) => !current.has(filter));
    stale = [...new Set([...recorded, ...options.overlapping])]
      .filter((filter) => !current.has(filter));
    if (stale.length > 0) await options.unsubscribe(stale);
    // The overlapping filters go every time, whether or not they were there: said only in debug.
    if (recorded.length > 0) {
      log.info("Unsubscribed what the previous run had and this one has not: {filters}", {
        filters: recorded,
      });
    } else if (stale.length > 0) {
      log.debug("Unsubscribed filters that would overlap ours, if any were left: {filters}", {
        filters: stale,
      });
    }
  }
  const record = { broker: options.broker, client_id: options.clientId, filters: [...current] };
  await Deno.writeTextFile(file, JSON.stringify(record) + "\n").catch((error) =>
    log.warn("Could not record the subscriptions in {file}: {message}", {
      file,
      message: (error as Error).message,
    })
  );
  return stale;
}

/** The filters recorded for this broker and client id; none when there is no such record. */
async function readRecord(file: string, broker: string, clientId: string): Promise<string[]> {
  try {
    const record = JSON.parse(await Deno.readTextFile(file));
    if (record?.broker !== broker || record?.client_id !== clientId) return [];
    return Array.isArray(record.filters)
      ? record.filters.filter((filter: unknown) => typeof filter === "string")
      : [];
  } catch {
    return [];
  }
}
