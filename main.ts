/**
 * vllm-mqtt: serve a large language model to MQTT clients.
 *
 * Parses the configuration, starts the service and stops it gracefully on
 * SIGINT or SIGTERM (a second one stops at once). Exit codes: 0 after a clean
 * stop (also one asked for during start-up), 1 when start-up fails, a part
 * fails for good (the engine gives up, another instance takes the MQTT client
 * id) or the stop is forced, 2 for a configuration error.
 *
 * @module
 */

import { ConfigError, helpText, parseConfig, versionText } from "./lib/config/config.ts";
import {
  missingPermissions,
  neededBy,
  permissionAdvice,
  requiredPermissions,
  workingFolderAdvice,
} from "./lib/config/permissions.ts";
import { closeLogging, logger, setupLogging } from "./lib/log.ts";
import type { Service } from "./lib/service.ts";
import { StartInterruptedError, StopSignals } from "./lib/service/stop_signals.ts";

/** Time for closing the parts after accepted requests had their `--shutdown-timeout`. */
const SHUTDOWN_MARGIN_MS = 5000;

async function main(): Promise<number> {
  // Run without the task (`deno run main.ts`): no permission at all. Said before anything reads
  // the environment (the `mqtt` package does as it is loaded, below).
  if (Deno.permissions.querySync({ name: "env" }).state !== "granted") {
    console.error(
      "vllm-mqtt: run it with 'deno task start [options]' in its folder (the task grants the " +
        "permissions it needs), or as 'deno run -q --no-prompt -P=service main.ts [options]'",
    );
    return 2;
  }
  let parsed;
  try {
    parsed = parseConfig(Deno.args, Deno.env.toObject());
  } catch (error) {
    if (!(error instanceof ConfigError)) throw error;
    console.error(`vllm-mqtt: ${error.message}`);
    return 2;
  }
  if (parsed.help) {
    console.log(parsed.show === "version" ? versionText() : helpText());
    return 0;
  }
  const { config } = parsed;
  // Before anything starts: a folder or host the permissions do not cover is named with the
  // command that grants it (Deno's own message suggests a flag `deno task start` cannot pass).
  const missing = missingPermissions(requiredPermissions(config));
  if (missing) {
    const advice = workingFolderAdvice(missing, new URL(".", import.meta.url).pathname) ??
      permissionAdvice(missing, Deno.args);
    console.error(`vllm-mqtt: ${advice}`);
    return 2;
  }
  await setupLogging({ level: config.logLevel, format: config.logFormat });
  const log = logger("main");
  for (const warning of config.warnings) log.warn(warning);

  // Signals are listened to from here on: a stop asked for during start-up (a broker that
  // does not answer, a model that takes minutes to load) closes what was started.
  const signals = new StopSignals();
  const startUp = new AbortController();
  // Set once the start-up is done (the linter misses the assignment below).
  // deno-lint-ignore prefer-const
  let service: Service | undefined;
  // Resolved with the exit code once the service has stopped (or the stop was given up).
  const { promise: stopped, resolve } = Promise.withResolvers<number>();
  const deadlineMs = config.shutdownTimeoutMs + SHUTDOWN_MARGIN_MS;
  const stop = (running: Service, why: string, code: number) => {
    log.info("{why}: stopping (a second SIGINT or SIGTERM stops at once)", { why });
    // Whatever the broker and the engine do, the stop ends: past the time accepted requests
    // may take, and a margin for closing, vLLM is killed and the program exits.
    const deadline = setTimeout(() => {
      log.error("Shutdown took longer than {s} s: stopping now", { s: deadlineMs / 1000 });
      running.killNow();
      resolve(1);
    }, deadlineMs);
    running.stop().then(() => resolve(code), (error) => {
      // Several failed steps come as one SuppressedError, nested: name each.
      for (const failure of stepFailures(error)) {
        log.error("Shutdown failed: {message}", { message: failure });
      }
      running.killNow();
      resolve(1);
    }).finally(() => clearTimeout(deadline));
  };
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    Deno.addSignalListener(signal, () => {
      switch (signals.receive(signal)) {
        case "copy":
          log.debug(
            "{signal} again {ms} ms later: the same request to stop, passed on twice; ignored",
            { signal, ms: Number(signals.sinceFirstMs()?.toFixed(2)) },
          );
          return;
        case "stop":
          if (service) return stop(service, signal, 0);
          log.info(
            "{signal} during start-up: stopping what was started (a second SIGINT or SIGTERM " +
              "stops at once)",
            { signal },
          );
          startUp.abort(new StartInterruptedError(signal));
          return;
        case "now":
          log.warn("{signal} again: stopping now, without waiting for accepted requests", {
            signal,
          });
          service?.killNow();
          resolve(1);
      }
    });
  }

  // Loaded once the permissions are known to be there (see the top of main).
  const { startService } = await import("./lib/service.ts");
  const started = await Promise.race([
    startService(config, { signal: startUp.signal }).then(
      (running) => ({ running }),
      (error: unknown) => ({ error }),
    ),
    // A second signal during start-up does not wait for it.
    stopped.then((code) => ({ code })),
  ]);
  if ("code" in started) {
    await closeLogging();
    return started.code;
  }
  if ("error" in started) {
    const { error } = started;
    if (error instanceof StartInterruptedError) {
      log.info("Stopped before serving");
      await closeLogging();
      return 0;
    }
    const code = error instanceof ConfigError ? 2 : 1;
    const needs = neededBy(error);
    const message = needs ? permissionAdvice(needs, Deno.args) : (error as Error).message;
    log.error("Start-up failed: {message}", { message });
    await closeLogging();
    return code;
  }
  const running = started.running;
  service = running;
  // Asked to stop as the start-up ended: the service stops as from a signal while serving.
  if (startUp.signal.aborted) stop(running, startUp.signal.reason.signal, 0);

  // A dying program must not leave vLLM's processes holding the GPU.
  globalThis.addEventListener("error", () => running.killNow());
  globalThis.addEventListener("unhandledrejection", (event) => {
    event.preventDefault();
    log.error("Unhandled rejection: {reason}", { reason: String(event.reason) });
  });
  running.failed.then((error) => {
    log.error("{message}", { message: error.message });
    if (signals.stopping) return;
    signals.stop();
    stop(running, "a part failed for good", 1);
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
