import { deepEqual, equal } from "node:assert/strict";
import { REPEAT_WINDOW_MS, StopSignals } from "../../lib/service/stop_signals.ts";

/** A clock the test moves. */
function clock() {
  let now = 0;
  return { now: () => now, advance: (ms: number) => now += ms };
}

Deno.test("stop signals: the first stops; its copy at once is ignored; a later one stops now", () => {
  const time = clock();
  const signals = new StopSignals({ now: time.now });
  equal(signals.stopping, false);
  equal(signals.receive("SIGINT"), "stop");
  equal(signals.stopping, true);
  // `deno task` passes the terminal's SIGINT on: the same signal, a moment later.
  time.advance(0.2);
  equal(signals.receive("SIGINT"), "copy");
  equal(signals.sinceFirstMs(), 0.2);
  time.advance(REPEAT_WINDOW_MS - 0.2);
  equal(signals.receive("SIGINT"), "copy");
  // A person's second Ctrl-C.
  time.advance(1);
  equal(signals.receive("SIGINT"), "now");
});

Deno.test("stop signals: another signal right after the first is a second request", () => {
  const time = clock();
  const signals = new StopSignals({ now: time.now });
  equal(signals.receive("SIGINT"), "stop");
  time.advance(1);
  equal(signals.receive("SIGTERM"), "now");
});

Deno.test("stop signals: after a stop for another reason, any signal stops now", () => {
  const time = clock();
  const signals = new StopSignals({ now: time.now });
  signals.stop();
  equal(signals.sinceFirstMs(), undefined);
  deepEqual([signals.receive("SIGTERM"), signals.receive("SIGTERM")], ["now", "now"]);
});

Deno.test("stop signals: the window is the caller's", () => {
  const time = clock();
  const signals = new StopSignals({ now: time.now, repeatWindowMs: 5 });
  equal(signals.receive("SIGTERM"), "stop");
  time.advance(6);
  equal(signals.receive("SIGTERM"), "now");
});
