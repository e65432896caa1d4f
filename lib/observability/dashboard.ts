/**
 * The operator's live page, at `/` of the HTTP endpoint: one HTML page, its
 * stylesheet and script (`page/`, plain files, no build step), uPlot from npm
 * for the charts, and a server-sent event stream that sends the service's
 * state about once a second. The stream carries counts and times only, never
 * conversation text.
 *
 * The "try it" panel ({@linkcode tryIt}) sends a message through the gateway
 * and streams the answer back to that page alone. With a token set, every
 * part of the page, "try it" included, needs it ({@linkcode DashboardAuth}).
 *
 * @module
 */

import uplotScript from "uplot/dist/uPlot.esm.js" with { type: "text" };
import uplotStyle from "uplot/dist/uPlot.min.css" with { type: "text" };
import appScript from "./page/app.js" with { type: "text" };
import pageHtml from "./page/index.html" with { type: "text" };
import pageStyle from "./page/style.css" with { type: "text" };
import type { Config } from "../config/config.ts";
import { logger } from "../log.ts";
import type { ChatRequest, ReplyBody } from "../protocol/mod.ts";
import { asset, plainText, SECURITY_HEADERS } from "./_util.ts";
import { DashboardAuth } from "./dashboard_auth.ts";
import type { ExperimentPanel } from "./experiment_monitor.ts";
import type { LivePoint, LiveStats, LiveSummary } from "./live_stats.ts";
import type { EngineGauges } from "./stats.ts";
import { tryIt, type TryItSource } from "./try_it.ts";

/** Where the page's numbers come from. */
export interface DashboardSource extends TryItSource {
  /** The service's state now (engine, broker, queue, sessions, instance). */
  state(): Record<string, unknown>;
  /** Per-second statistics, once the service serves. */
  live(): LiveStats | undefined;
  /** The experiments' panels as last computed, when a project runs one. */
  experiments?(): readonly ExperimentPanel[] | undefined;
}

/** Options of {@linkcode Dashboard}. */
export interface DashboardOptions {
  /** Needed for every part of the page when set. */
  readonly token?: string;
  /** Whether the "try it" panel is served. */
  readonly tryIt: boolean;
  /** Milliseconds between updates. @default {1000} */
  readonly intervalMs?: number;
}

/** One update of the event stream. */
export interface DashboardUpdate {
  readonly t: number;
  readonly state: Record<string, unknown>;
  readonly summary: LiveSummary | null;
  readonly point: LivePoint | null;
  /** One panel per project with an experiment: its variants, intervals and verdicts. */
  readonly experiments: readonly ExperimentPanel[] | null;
}

const log = logger("http");
const JS = "text/javascript; charset=utf-8";
const CSS = "text/css; charset=utf-8";
/**
 * The page's files, and uPlot's. Imported as text, they are part of the module
 * graph: in the compiled executable with no `--include`, and read from it
 * without a read permission (a file embedded with `--include` lies in a
 * virtual folder that `-P=service` does not grant).
 */
const FILES: Record<string, { body: string; type: string }> = {
  "/": { body: pageHtml, type: "text/html; charset=utf-8" },
  "/dashboard/app.js": { body: appScript, type: JS },
  "/dashboard/style.css": { body: pageStyle, type: CSS },
  "/dashboard/uplot.js": { body: uplotScript, type: JS },
  "/dashboard/uplot.css": { body: uplotStyle, type: CSS },
};
const encoder = new TextEncoder();

/** Serves the live page; {@linkcode handle} answers the paths it owns. */
export class Dashboard {
  readonly #source: DashboardSource;
  readonly #options: DashboardOptions;
  readonly #auth: DashboardAuth;
  readonly #streams = new Set<() => void>();

  constructor(source: DashboardSource, options: DashboardOptions) {
    this.#source = source;
    this.#options = options;
    this.#auth = new DashboardAuth(options.token);
  }

  /**
   * The response for a path of the page, or undefined for any other path.
   * `client` (its address) is what wrong tokens are counted against.
   */
  handle(request: Request, client = ""): Promise<Response> | undefined {
    const path = new URL(request.url).pathname;
    if (path !== "/" && path !== "/index.html" && !path.startsWith("/dashboard/")) {
      return undefined;
    }
    return this.#route(request, path === "/index.html" ? "/" : path, client);
  }

  /** Ends every event stream (a server cannot shut down while one is open). */
  close(): void {
    for (const end of this.#streams) end();
  }

  async #route(request: Request, path: string, client: string): Promise<Response> {
    if (path === "/dashboard/login" && request.method === "POST") {
      return await this.#auth.login(request, client);
    }
    const refused = await this.#auth.gate(request, client, path);
    if (refused) return refused;
    if (path === "/dashboard/try") {
      if (!this.#options.tryIt) return plainText("try it is turned off on this service\n", 404);
      if (request.method !== "POST") {
        return plainText("method not allowed\n", 405, { allow: "POST" });
      }
      return await tryIt(request, this.#source);
    }
    if (request.method !== "GET" && request.method !== "HEAD") {
      return plainText("method not allowed\n", 405, { allow: "GET" });
    }
    if (path === "/dashboard/events") return this.#events();
    const file = FILES[path];
    if (!file) return plainText("not found\n", 404);
    return asset(file.body, file.type);
  }

  get #interval(): number {
    return this.#options.intervalMs ?? 1000;
  }

  /** Server-sent events: `hello` with the charted history, then an `update` each interval. */
  #events(): Response {
    let timer: ReturnType<typeof setInterval> | undefined;
    let end = () => {};
    const body = new ReadableStream<Uint8Array>({
      start: (controller) => {
        const send = (event: string, data: unknown) =>
          controller.enqueue(encoder.encode(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`));
        end = () => {
          clearInterval(timer);
          this.#streams.delete(end);
          try {
            controller.close();
          } catch { /* closed */ }
        };
        this.#streams.add(end);
        const live = this.#source.live();
        send("hello", {
          projects: this.#source.projects,
          interval_ms: this.#interval,
          try_it: this.#options.tryIt,
          history: live?.history() ?? [],
        });
        const update = () => {
          try {
            send("update", this.#update());
          } catch (error) {
            log.warn("Live page update not sent: {message}", { message: String(error) });
            end();
          }
        };
        update();
        timer = setInterval(update, this.#interval);
      },
      cancel: () => end(),
    });
    return new Response(body, {
      headers: {
        "content-type": "text/event-stream; charset=utf-8",
        "cache-control": "no-store",
        ...SECURITY_HEADERS,
      },
    });
  }

  /** What one update of the stream says. */
  #update(): DashboardUpdate {
    const live = this.#source.live();
    return {
      t: Date.now(),
      state: this.#source.state(),
      summary: live?.summary() ?? null,
      point: live ? live.point(live.second - 1) : null,
      experiments: this.#source.experiments?.() ?? null,
    };
  }
}

/** One engine of several, as `/status` and the live page show it (snake case, as the rest). */
export function engineStatus(engine: EngineGauges) {
  return {
    id: engine.id,
    url: engine.url,
    state: engine.state,
    in_flight: engine.inFlight,
    waiting: engine.waiting ?? null,
    prefix_hit_rate: engine.prefixHitRate ?? null,
    sessions: engine.sessions,
    turns: engine.turns,
    errors: engine.errors,
    outages: engine.outages,
    restarts: engine.restarts,
    decisions: engine.decisions,
  };
}

/** The parts of a running service the page reports on, as they come up. */
export interface ServiceParts {
  /** The engines, read as one: ready while any is, outages and restarts summed. */
  readonly engines?: {
    readonly state: string;
    readonly outages: number;
    readonly restarts: Readonly<Record<string, number>>;
  };
  /** Several engines: each one's health, load and routing. */
  readonly routing?: { engineGauges(): EngineGauges[] };
  readonly storageHealth?: { readonly available: boolean; readonly reason: string | undefined };
  readonly client?: { readonly connected: boolean };
  /** The broker the service connects to, once chosen (a URL without its password). */
  readonly broker?: BrokerChoice;
  readonly serving?: {
    readonly gateway: {
      readonly queued: number;
      readonly inFlight: number;
      ask(request: ChatRequest, deliver: (body: ReplyBody) => void): () => void;
    };
    readonly directory: { readonly size: number };
    readonly live: LiveStats;
    readonly experiments?: { snapshot(): readonly ExperimentPanel[] | undefined };
  };
}

/** The broker the service chose: its URL (without a password), and whether it started it. */
export interface BrokerChoice {
  readonly url: string;
  readonly embedded: boolean;
}

/** The broker as the page names it: which one, and on which port. */
export function brokerLabel(config: Pick<Config, "embeddedBrokerPort">, broker?: BrokerChoice) {
  if (broker === undefined) {
    return `localhost:${config.embeddedBrokerPort}, or an embedded broker there (not chosen yet)`;
  }
  return broker.embedded ? `${broker.url} (embedded, started by this program)` : broker.url;
}

/** The page of a service with `config`, reading `parts` as they come up. */
export function serviceDashboard(config: Config, parts: Readonly<ServiceParts>): Dashboard {
  const startedAt = Date.now();
  return new Dashboard({
    projects: config.projects,
    limits: config,
    live: () => parts.serving?.live,
    experiments: () => parts.serving?.experiments?.snapshot(),
    ask: (request, deliver) => parts.serving?.gateway.ask(request, deliver),
    state: () => {
      const engineState = parts.engines?.state ?? "starting";
      return {
        status: parts.serving ? "online" : "starting",
        instance: {
          id: config.mqttClientId,
          share_group: config.shareGroup ?? null,
          service: config.serviceName,
          started_at: new Date(startedAt).toISOString(),
          uptime_s: Math.round((Date.now() - startedAt) / 1000),
        },
        model: config.servedModelName,
        engine: {
          mode: config.engine,
          state: engineState,
          ready: engineState === "ready",
          circuit: engineState === "ready" ? "closed" : engineState === "down" ? "open" : "-",
          outages: parts.engines?.outages ?? 0,
          restarts: parts.engines?.restarts ?? {},
          engines: parts.routing?.engineGauges().map(engineStatus) ?? [],
        },
        broker: {
          url: brokerLabel(config, parts.broker),
          connected: parts.client?.connected ?? false,
        },
        storage: {
          available: parts.storageHealth?.available ?? false,
          reason: parts.storageHealth?.reason ?? null,
        },
        queue: {
          queued: parts.serving?.gateway.queued ?? 0,
          max_queue: config.maxQueue,
          in_flight: parts.serving?.gateway.inFlight ?? 0,
          max_in_flight: config.maxInFlight,
        },
        live_sessions: parts.serving?.directory.size ?? 0,
        max_sessions: config.maxSessions,
      };
    },
  }, { token: config.dashboardToken, tryIt: config.dashboardTryIt });
}

/** Whether an address to listen on is reachable from this machine only. */
export function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || host === "[::1]" || host.startsWith("127.");
}
