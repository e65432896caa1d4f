/**
 * The service's status topic: what another instance with our MQTT client id
 * says there.
 *
 * @module
 */

import type { TakeoverWatch } from "../mqtt/connect.ts";

/**
 * A status message on our own status topic: our own `online` coming back
 * (from then on it is the retained status), or a status from an instance
 * with our client id that started before us: the instance we would be
 * fighting for the id. Its `online` status says it is there; so does its
 * Last Will (`offline`) arriving while we are connected, fired because our
 * connection just took its session over. A retained `offline` is only an
 * earlier run that has stopped. {@linkcode TakeoverWatch} weighs them.
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
    if (
      status?.status === "online" && status.instance === instance &&
      status.started_at === startedAt
    ) {
      return takeover.announced();
    }
    const there = status?.status === "online" || (status?.status === "offline" && !retained);
    if (
      there && status.instance === instance && typeof status.started_at === "string" &&
      status.started_at < startedAt
    ) {
      takeover.olderInstanceSeen();
    }
  } catch { /* not a status of ours */ }
}
