/**
 * The service's HTTP endpoint for operators (liveness, readiness, metrics,
 * status, and the live page), reporting on the parts that are up so far: it
 * comes up first.
 *
 * @module
 */

import type { MqttClient } from "mqtt";
import { type Config, ConfigError } from "../config/config.ts";
import type { EngineFleet } from "../engine/engine_fleet.ts";
import type { FleetRouting } from "../gateway/fleet_routing.ts";
import type { Gateway } from "../gateway/gateway.ts";
import type { Experiments } from "../gateway/experiments.ts";
import { ExperimentEndpoint } from "./experiment_endpoint.ts";
import { logger } from "../log.ts";
import { redact } from "../mqtt/connect.ts";
import {
  type BrokerChoice,
  engineStatus,
  isLoopback,
  serviceDashboard,
} from "../observability/dashboard.ts";
import { type HttpEndpoint, serveHttpEndpoint } from "../observability/http_endpoint.ts";
import type { ExperimentMonitor } from "../observability/experiment_monitor.ts";
import type { LiveStats } from "../observability/live_stats.ts";
import type { Stats } from "../observability/stats.ts";
import type { SessionDirectory } from "../sessions/session_directory.ts";
import type { StorageHealth } from "../sessions/storage_health.ts";

const log = logger("service");

/** The service's parts as they come up, for the HTTP endpoint (which comes up first). */
export interface Parts {
  /** The engines, read as one where one is asked about (ready while any is, restarts summed). */
  engines?: EngineFleet;
  /** The router over several engines (none with one engine). */
  routing?: FleetRouting;
  storageHealth?: StorageHealth;
  client?: MqttClient;
  broker?: BrokerChoice;
  serving?: {
    gateway: Gateway;
    directory: SessionDirectory;
    stats: Stats;
    live: LiveStats;
    /** The projects' experiments' figures, when some project has one. */
    experiments: ExperimentMonitor | undefined;
  };
  /** The sessions' experiment variants and the operator's decisions, when a project runs one. */
  experiments?: Experiments;
}

/** The HTTP endpoint, reporting on the parts that are up so far. */
export function serveOperatorEndpoint(config: Config, parts: Readonly<Parts>): HttpEndpoint {
  const startedAt = new Date().toISOString();
  const engineState = () => parts.engines?.state ?? "starting";
  const dashboard = config.dashboard ? serviceDashboard(config, parts) : undefined;
  const experiments = new ExperimentEndpoint({
    token: config.dashboardToken,
    httpHost: config.httpHost,
    experiments: () => parts.serving && parts.experiments,
    projects: config.projects,
  });
  try {
    const endpoint = serveHttpEndpoint({
      hostname: config.httpHost,
      port: config.httpPort,
      allowedHosts: config.httpAllowedHosts,
    }, {
      page: (request, client) =>
        experiments.handle(request, client) ?? dashboard?.handle(request, client),
      readiness: () => {
        const broker = parts.client?.connected ?? false;
        const engine = engineState() === "ready";
        const serving = parts.serving !== undefined;
        const storage = parts.storageHealth?.available ?? false;
        const reason = parts.storageHealth?.reason;
        return {
          ready: broker && engine && serving && storage,
          broker,
          engine,
          serving,
          storage,
          ...(reason !== undefined && { reason: `session store: ${reason}` }),
        };
      },
      metrics: () =>
        (parts.serving?.stats.prometheus() ?? "") +
        (parts.serving?.experiments?.prometheus() ?? ""),
      status: () => ({
        status: parts.serving ? "online" : "starting",
        instance: config.mqttClientId,
        model: config.servedModelName,
        projects: config.projects,
        started_at: startedAt,
        broker: {
          url: parts.broker?.url ?? (config.mqttUrl && redact(config.mqttUrl)),
          embedded: parts.broker?.embedded ?? false,
          connected: parts.client?.connected ?? false,
        },
        engine: {
          mode: config.engine,
          state: engineState(),
          restarts: parts.engines?.restarts ?? {},
          // Several engines: each one, with its load and routing.
          ...(parts.routing && { engines: parts.routing.engineGauges().map(engineStatus) }),
        },
        queued: parts.serving?.gateway.queued ?? 0,
        in_flight: parts.serving?.gateway.inFlight ?? 0,
        live_sessions: parts.serving?.directory.size ?? 0,
      }),
    });
    if (dashboard && config.dashboardToken === undefined && !isLoopback(config.httpHost)) {
      log.warn(
        'The live page at / (and its "try it" panel) is open to anyone who reaches {host}: ' +
          "set VLLM_MQTT_DASHBOARD_TOKEN, or --no-dashboard",
        { host: config.httpHost },
      );
    }
    // Its event streams stay open: the server cannot shut down before they end.
    return { port: endpoint.port, close: () => (dashboard?.close(), endpoint.close()) };
  } catch (error) {
    if (!(error instanceof Deno.errors.AddrInUse)) throw error;
    throw new ConfigError(
      `'--http-port' ${config.httpPort} on ${config.httpHost} is in use (is another instance running?): ` +
        `choose another port, or 0 to turn the HTTP endpoint off`,
    );
  }
}
