/**
 * Runs the simulated engine in a Web Worker (`--engine sim`), so that its
 * token timers and JSON work stay off the thread holding the MQTT connection.
 *
 * @module
 */

/// <reference lib="deno.worker" />

import { type SimulatorOptions, startSimulator } from "./simulator.ts";

self.onmessage = async (event: MessageEvent<SimulatorOptions>) => {
  const simulator = await startSimulator(event.data);
  self.postMessage({ url: simulator.url });
};
