/** The protocol's one error conversion and its form between threads (lib/protocol/errors.ts). */

import { deepEqual, equal } from "node:assert/strict";
import { asServiceError, fromWire, ServiceError, toWire } from "../../lib/protocol/errors.ts";

Deno.test("asServiceError: a ServiceError is itself; anything else is internal, its message kept", () => {
  const own = new ServiceError("queue_full", "full", { retryAfterMs: 1000 });
  equal(asServiceError(own), own);
  const thrown = new TypeError("boom");
  const failure = asServiceError(thrown);
  deepEqual([failure.code, failure.message, failure.cause], [
    "internal",
    "internal error: boom",
    thrown,
  ]);
  equal(asServiceError("plain").message, "internal error: plain");
});

Deno.test("toWire/fromWire: code, message and retry hint cross; the cause does not", () => {
  const error = new ServiceError("cancelled", "the service is shutting down", {
    retryAfterMs: 5000,
    cause: new Error("inner"),
  });
  const wire = toWire(error);
  // Exactly what a structured clone carries: no class, no cause, no undefined key.
  deepEqual(structuredClone(wire), {
    code: "cancelled",
    message: "the service is shutting down",
    retryAfterMs: 5000,
  });
  deepEqual(Object.keys(toWire(new ServiceError("timeout", "slow"))), ["code", "message"]);
  const back = fromWire(wire);
  equal(back.constructor, ServiceError);
  deepEqual([back.code, back.message, back.retryAfterMs, back.cause], [
    "cancelled",
    "the service is shutting down",
    5000,
    undefined,
  ]);
});
