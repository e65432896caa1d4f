/**
 * Telling a fight over our MQTT client id from a broker that drops us: only
 * an older instance seen during the connection that is then closed at once
 * counts as a takeover.
 */

import { equal } from "node:assert/strict";
import { TakeoverWatch } from "../../lib/mqtt/connect.ts";

Deno.test("takeover: twice an older instance seen, then our connection closed at once: stop", () => {
  const watch = new TakeoverWatch();
  watch.connected(0);
  watch.announced();
  watch.olderInstanceSeen();
  equal(watch.closed(500, false), false);
  watch.connected(800);
  watch.olderInstanceSeen();
  equal(watch.closed(1200, false), true);
});

Deno.test("takeover: a gone run's status seen once does not make a later quick close a takeover", () => {
  const watch = new TakeoverWatch();
  // At the start, the retained status (or the Will) of a run that is gone, before our own.
  watch.connected(0);
  watch.olderInstanceSeen();
  watch.announced();
  // The broker restarts at once, and again just after we are back.
  equal(watch.closed(500, false), false);
  watch.connected(1000);
  equal(watch.closed(1500, false), false);
  watch.connected(2000);
  equal(watch.closed(2500, false), false);
});

Deno.test("takeover: an MQTT 5 broker's 'session taken over' on a quick close: stop", () => {
  const watch = new TakeoverWatch();
  watch.connected(0);
  equal(watch.closed(100, true), true);
  watch.connected(200);
  equal(watch.closed(5000, true), false);
});
