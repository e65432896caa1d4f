/**
 * The service's status topic: what another instance with our MQTT client id
 * says there.
 *
 * @module
 */

import type { TakeoverWatch } from "../mqtt/connect.ts";

/**
 * A status message on our own status topic, from an instance with our client
 * id that started before us: the instance we would be fighting for the id.
 * Its `online` status says it is there; so does its Last Will (`offline`)
 * arriving while we are connected, fired because our connection just took its
 * session over. A retained `offline` is only an earlier run that has stopped.
 */
export function noteStatus(
  payload: Uint8Array,
  retained: boolean,
  instance: string,
  startedAt: string,
  takeover: TakeoverWatch,
): void {
  try {
    const status = JSON.parse(new TextDecoder().decode(payload));
    const there = status?.status === "online" || (status?.status === "offline" && !retained);
    if (
      there && status.instance === instance && typeof status.started_at === "string" &&
      status.started_at < startedAt
    ) {
      takeover.olderInstanceSeen();
    }
  } catch { /* not a status of ours */ }
}
