/**
 * A request worker (Web Worker entry). It runs many turns at once: the engine
 * batches them, and the in-flight cap, not the number of workers, bounds
 * concurrency. It exists to keep session I/O, tokenizing and JSON off the
 * thread that holds the MQTT connection.
 *
 * @module
 */

/// <reference lib="deno.worker" />

import { setupLogging } from "../log.ts";
import { fromWire, toWire } from "../protocol/errors.ts";
import type { FromWorker, ToWorker, WorkerSettings } from "./messages.ts";
import { runTurn } from "./run_turn.ts";
import { closeEngines, openTurnContext, type TurnContext, turnFailure } from "./turn_context.ts";

let context: Promise<TurnContext> | undefined;
const running = new Map<number, AbortController>();

const post = (message: FromWorker) => self.postMessage(message);

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
          runTurn(job, ctx, controller.signal, (seq, text) => {
            post({ type: "delta", id: job.id, seq, text });
          })
        )
        .then((result) => post({ type: "done", id: job.id, result }))
        .catch((error) => {
          post({ type: "error", id: job.id, error: toWire(turnFailure(error, controller.signal)) });
        })
        .finally(() => running.delete(job.id));
      break;
    }
    case "cancel":
      running.get(message.id)?.abort(fromWire(message.reason));
      break;
    case "close":
      context?.then((ctx) => {
        closeEngines(ctx);
        ctx.store.close();
      }).finally(() => post({ type: "closed" }));
      break;
  }
};
