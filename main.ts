/**
 * vllm-mqtt: serve a large language model to MQTT clients.
 *
 * Parses the configuration, starts the service and stops it gracefully on
 * SIGINT or SIGTERM (a second one stops at once). Exit codes: 0 after a clean
 * stop, 1 when start-up fails, a part fails for good (the engine gives up,
 * another instance takes the MQTT client id) or the stop is forced, 2 for a
 * configuration error.
 *
 * @module
 */

import { ConfigError, helpText, parseConfig } from "./lib/config/config.ts";
import {
  missingPermissions,
  neededBy,
  permissionAdvice,
  requiredPermissions,
} from "./lib/config/permissions.ts";
import { closeLogging, logger, setupLogging } from "./lib/log.ts";
import { type Service, startService } from "./lib/service.ts";

/** Time for closing the parts after accepted requests had their `--shutdown-timeout`. */
const SHUTDOWN_MARGIN_MS = 5000;

async function main(): Promise<number> {
  let parsed;
  try {
    parsed = parseConfig(Deno.args, Deno.env.toObject());
  } catch (error) {
    if (!(error instanceof ConfigError)) throw error;
    console.error(`vllm-mqtt: ${error.message}`);
    return 2;
  }
  if (parsed.help) {
    console.log(helpText());
    return 0;
  }
  const { config } = parsed;
  // Before anything starts: a folder or host the permissions do not cover is named with the
  // command that grants it (Deno's own message suggests a flag `deno task start` cannot pass).
  const missing = missingPermissions(requiredPermissions(config));
  if (missing) {
    console.error(`vllm-mqtt: ${permissionAdvice(missing, Deno.args)}`);
    return 2;
  }
  await setupLogging({ level: config.logLevel, format: config.logFormat });
  const log = logger("main");
  for (const warning of config.warnings) log.warn(warning);

  let service: Service;
  try {
    service = await startService(config);
  } catch (error) {
    const code = error instanceof ConfigError ? 2 : 1;
    const needs = neededBy(error);
    const message = needs ? permissionAdvice(needs, Deno.args) : (error as Error).message;
    log.error("Start-up failed: {message}", { message });
    await closeLogging();
    return code;
  }

  // A dying program must not leave vLLM's processes holding the GPU.
  globalThis.addEventListener("error", () => service.killNow());
  globalThis.addEventListener("unhandledrejection", (event) => {
    event.preventDefault();
    log.error("Unhandled rejection: {reason}", { reason: String(event.reason) });
  });

  // Resolved with the exit code once the service has stopped (or the stop was given up).
  const { promise: stopped, resolve } = Promise.withResolvers<number>();
  let stopping = false;
  const stop = (why: string, code: number) => {
    if (stopping) return;
    stopping = true;
    log.info("{why}: stopping (a second SIGINT or SIGTERM stops at once)", { why });
    // Whatever the broker and the engine do, the stop ends: past the time accepted requests
    // may take, and a margin for closing, vLLM is killed and the program exits.
    const deadline = setTimeout(() => {
      log.error("Shutdown took longer than {s} s: stopping now", { s: deadlineMs / 1000 });
      service.killNow();
      resolve(1);
    }, deadlineMs);
    service.stop().then(() => resolve(code), (error) => {
      // Several failed steps come as one SuppressedError, nested: name each.
      for (const failure of stepFailures(error)) {
        log.error("Shutdown failed: {message}", { message: failure });
      }
      service.killNow();
      resolve(1);
    }).finally(() => clearTimeout(deadline));
  };
  const deadlineMs = config.shutdownTimeoutMs + SHUTDOWN_MARGIN_MS;
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    Deno.addSignalListener(signal, () => {
      if (!stopping) return stop(signal, 0);
      log.warn("{signal} again: stopping now, without waiting for accepted requests", {
        signal,
      });
      service.killNow();
      resolve(1);
    });
  }
  service.failed.then((error) => {
    log.error("{message}", { message: error.message });
    stop("a part failed for good", 1);
  });
  const code = await stopped;
  await closeLogging();
  return code;
}

/** The messages of the errors a stop threw: one, or each of those a SuppressedError nests. */
function stepFailures(error: unknown): string[] {
  if (error instanceof SuppressedError) {
    return [...stepFailures(error.error), ...stepFailures(error.suppressed)];
  }
  return [(error as Error)?.message ?? String(error)];
}

Deno.exit(await main());
