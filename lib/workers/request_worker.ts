/**
 * A request worker (Web Worker entry). It runs many turns at once: the engine
 * batches them, and the in-flight cap, not the number of workers, bounds
 * concurrency. It exists to keep session I/O, tokenizing and JSON off the
 * thread that holds the MQTT connection.
 *
 * @module
 */

/// <reference lib="deno.worker" />

import { readTick } from "../engine/socket_reader.ts";
import { setupLogging } from "../log.ts";
import { ServiceError } from "../protocol/errors.ts";
import type { FromWorker, ToWorker, WorkerSettings } from "./messages.ts";
import { runTurn, type TurnContext } from "./run_turn.ts";
import { openTurnContext, turnFailure } from "./turn_context.ts";

let context: Promise<TurnContext> | undefined;
const running = new Map<number, AbortController>();

const post = (message: FromWorker) => self.postMessage(message);

/**
 * Deltas not yet sent, `[id, seq, text]` after another, sent together at the
 * next tick of the read clock (the streams' reads wait for it too): each
 * message wakes the gateway, which costs more CPU than the deltas' own work,
 * and the gateway then publishes them together. A turn's first delta goes at
 * once, with whatever waits.
 */
let outbox: (number | string)[] = [];

function sendDeltas(): void {
  if (outbox.length === 0) return;
  post({ type: "deltas", deltas: outbox });
  outbox = [];
}

function delta(id: number, seq: number, text: string): void {
  if (outbox.length === 0 && seq > 0) readTick().then(sendDeltas);
  outbox.push(id, seq, text);
  // A turn's first delta goes at once: time to first delta is what a user notices.
  if (seq === 0) sendDeltas();
}

async function open(settings: WorkerSettings): Promise<TurnContext> {
  // A worker is an isolate of its own: its log records go nowhere until it is set up.
  await setupLogging(settings.log ?? { level: "info", format: "text" });
  return await openTurnContext(settings);
}

// Set before any await: a message that arrives while the module awaits is lost.
self.onmessage = (event: MessageEvent<ToWorker>) => {
  const message = event.data;
  switch (message.type) {
    case "init":
      context = open(message.settings);
      context.then(() => post({ type: "ready" }));
      break;
    case "run": {
      const { job } = message;
      const controller = new AbortController();
      running.set(job.id, controller);
      context!
        .then((ctx) =>
          runTurn(job, ctx, controller.signal, (seq, text) => delta(job.id, seq, text))
        )
        .then((result) => {
          // Its deltas before its outcome.
          sendDeltas();
          post({ type: "done", id: job.id, result });
        })
        .catch((error) => {
          const failure = turnFailure(error, controller.signal);
          sendDeltas();
          post({
            type: "error",
            id: job.id,
            code: failure.code,
            message: failure.message,
            retryAfterMs: failure.retryAfterMs,
          });
        })
        .finally(() => running.delete(job.id));
      break;
    }
    case "cancel":
      running.get(message.id)?.abort(
        new ServiceError(message.code, message.message, { retryAfterMs: message.retryAfterMs }),
      );
      break;
    case "close":
      context?.then((ctx) => {
        ctx.engine.close();
        ctx.store.close();
      }).finally(() => post({ type: "closed" }));
      break;
  }
};
