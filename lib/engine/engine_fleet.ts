/**
 * The engines the service sends turns to: one or several (`--engine-url` with
 * several URLs, `--visible-devices` with several GPU groups, `--sim-engines`),
 * each with an id (`e0`, `e1`, ...), its own health probe and circuit, and (a
 * managed vLLM) its own restarts. The fleet gives up only when every engine
 * has given up for good: a managed engine that crashed too often stays out,
 * and the others serve.
 *
 * @module
 */

import type { Config } from "../config/config.ts";
import { logger } from "../log.ts";
import { EngineHealth, type EngineState } from "./engine_health.ts";
import type { EngineNeeds, RunningEngine } from "./running_engine.ts";
import { startEngines } from "./start_engines.ts";

const log = logger("engine");

/** One engine of the fleet. */
export interface FleetEngine {
  /** `e0`, `e1`, ...: the engine's label in logs, metrics and the status. */
  readonly id: string;
  /** Its place in the fleet: what a worker is told to send a turn to. */
  readonly index: number;
  readonly running: RunningEngine;
  readonly health: EngineHealth;
  /** Whether it gave up for good (a managed vLLM that crashed too often). */
  readonly gaveUp: boolean;
}

/** Options of {@linkcode EngineFleet.start}. */
export interface EngineFleetOptions {
  /**
   * Told when an engine's circuit opens or closes (`ready` true: it takes
   * turns again), and when it gives up for good (false, for ever).
   * @default {undefined}
   */
  readonly onHealth?: (index: number, ready: boolean) => void;
  /**
   * Aborted to stop the start-up (a vLLM still loading is stopped).
   * @default {undefined}
   */
  readonly signal?: AbortSignal;
}

/** The engines, started, with their health. */
export class EngineFleet {
  readonly engines: readonly FleetEngine[];
  /** Resolves (with a reason) once every engine has given up for good. */
  readonly failed: Promise<Error>;

  private constructor(engines: FleetEngine[], failed: Promise<Error>) {
    this.engines = engines;
    this.failed = failed;
  }

  /** Starts the engines of `config` for projects that need `needs`, and probes each. */
  static async start(
    config: Config,
    needs: EngineNeeds,
    options: EngineFleetOptions = {},
  ): Promise<EngineFleet> {
    const running = await startEngines(config, needs, options.signal);
    const several = running.length > 1;
    const engines = running.map((engine, index) => {
      const id = `e${index}`;
      const member = {
        id,
        index,
        running: engine,
        gaveUp: false,
        health: new EngineHealth({
          probeUrl: engine.probeUrl,
          apiKey: engine.endpoint.apiKey,
          // One engine keeps today's log lines; several name theirs.
          ...(several && { name: id }),
          onChange: (state: EngineState) => options.onHealth?.(index, state === "ready"),
        }).start(),
      };
      if (several) {
        log.info("Engine {id}: {url}", { id, url: engine.endpoint.baseUrl });
      }
      return member;
    });
    const failures = engines.map((member) =>
      member.running.failed.then((error) => {
        member.gaveUp = true;
        options.onHealth?.(member.index, false);
        const left = engines.filter((other) => !other.gaveUp).length;
        if (left > 0) {
          log.error(
            "Engine {id} gave up for good ({message}); it stays out, {left} other(s) serve",
            { id: member.id, message: error.message, left },
          );
        }
        return error;
      })
    );
    const failed = Promise.all(failures).then((errors) =>
      errors.length === 1
        ? errors[0]
        : new Error(`every engine gave up: ${errors.map((error) => error.message).join("; ")}`)
    );
    return new EngineFleet(engines, failed);
  }

  /** The first engine (the only one, unless several are configured). */
  get first(): FleetEngine {
    return this.engines[0];
  }

  /** `ready` while any engine takes turns (what readiness and the status say). */
  get state(): EngineState {
    return this.engines.some((engine) => !engine.gaveUp && engine.health.state === "ready")
      ? "ready"
      : "down";
  }

  /** Times a circuit has opened, over all engines. */
  get outages(): number {
    return this.engines.reduce((sum, engine) => sum + engine.health.outages, 0);
  }

  /** Restarts of the managed engines, by cause, over all engines. */
  get restarts(): Readonly<Record<string, number>> {
    const total: Record<string, number> = {};
    for (const { running } of this.engines) {
      for (const [cause, n] of Object.entries(running.restarts)) {
        total[cause] = (total[cause] ?? 0) + n;
      }
    }
    return total;
  }

  /** Stops the probes, then the engines. */
  async close(): Promise<void> {
    await Promise.all(this.engines.map((engine) => engine.health.close()));
    await Promise.all(this.engines.map((engine) => engine.running.close()));
  }

  /** Kills child processes at once, without waiting (the program is dying). */
  killNow(): void {
    for (const engine of this.engines) engine.running.killNow();
  }
}
