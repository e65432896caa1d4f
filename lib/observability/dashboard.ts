/**
 * The operator's live page, at `/` of the HTTP endpoint: one HTML page, its
 * stylesheet and script (`page/`, plain files, no build step), uPlot from npm
 * for the charts, and a server-sent event stream
 * that sends the service's state about once a second. The stream carries
 * counts and times only, never conversation text.
 *
 * A "try it" panel sends a message through the gateway's in-process entry
 * ({@linkcode Gateway.ask}) under a session id of the page's own
 * (`dashboard-…`) and streams the answer back to that page alone, as lines
 * of JSON. With a token set, every part of the page (and "try it") needs it:
 * `Authorization: Bearer TOKEN`, or the cookie the page's sign-in form sets.
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
import { redact } from "../mqtt/connect.ts";
import {
  type ChatRequest,
  parseRequest,
  type ReplyBody,
  type RequestLimits,
} from "../protocol/mod.ts";
import type { LivePoint, LiveStats, LiveSummary } from "./live_stats.ts";

/** Session ids the page may use: its own, never a client's. */
export const DASHBOARD_SESSION = /^dashboard-[A-Za-z0-9]{8,40}$/;

/** Where the page's numbers come from. */
export interface DashboardSource {
  /** The service's state now (engine, broker, queue, sessions, instance). */
  state(): Record<string, unknown>;
  /** Per-second statistics, once the service serves. */
  live(): LiveStats | undefined;
  /** The gateway's in-process entry, once the service serves. */
  ask(
    request: ChatRequest,
    deliver: (body: ReplyBody) => void,
  ): (() => void) | undefined;
  readonly projects: readonly string[];
  readonly limits: RequestLimits;
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
}

const log = logger("http");
const COOKIE = "vllm_mqtt_dashboard";
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
const SECURITY_HEADERS = {
  "x-content-type-options": "nosniff",
  "referrer-policy": "no-referrer",
  "x-frame-options": "DENY",
  "content-security-policy":
    "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
};
const encoder = new TextEncoder();

/** Serves the live page; {@linkcode handle} answers the paths it owns. */
export class Dashboard {
  readonly #source: DashboardSource;
  readonly #options: DashboardOptions;
  readonly #streams = new Set<() => void>();
  /** SHA-256 of the token, as the cookie holds it (the token itself stays out of the browser). */
  readonly #cookieValue: Promise<string> | undefined;

  constructor(source: DashboardSource, options: DashboardOptions) {
    this.#source = source;
    this.#options = options;
    this.#cookieValue = options.token === undefined ? undefined : sha256Hex(options.token);
  }

  /** The response for a path of the page, or undefined for any other path. */
  handle(request: Request): Promise<Response> | undefined {
    const path = new URL(request.url).pathname;
    if (path !== "/" && path !== "/index.html" && !path.startsWith("/dashboard/")) {
      return undefined;
    }
    return this.#route(request, path === "/index.html" ? "/" : path);
  }

  /** Ends every event stream (a server cannot shut down while one is open). */
  close(): void {
    for (const end of this.#streams) end();
  }

  async #route(request: Request, path: string): Promise<Response> {
    if (path === "/dashboard/login" && request.method === "POST") return await this.#login(request);
    if (!(await this.#authorized(request))) {
      if (path === "/" && request.method !== "POST") {
        return page(LOGIN_PAGE, 401, { "www-authenticate": 'Bearer realm="vllm-mqtt"' });
      }
      return text("a token is needed: Authorization: Bearer TOKEN\n", 401, {
        "www-authenticate": 'Bearer realm="vllm-mqtt"',
      });
    }
    if (path === "/dashboard/try") {
      if (!this.#options.tryIt) return text("try it is turned off on this service\n", 404);
      if (request.method !== "POST") return text("method not allowed\n", 405, { allow: "POST" });
      return await this.#tryIt(request);
    }
    if (request.method !== "GET" && request.method !== "HEAD") {
      return text("method not allowed\n", 405, { allow: "GET" });
    }
    if (path === "/dashboard/events") return this.#events();
    const file = FILES[path];
    if (!file) return text("not found\n", 404);
    return asset(file.body, file.type);
  }

  get #interval(): number {
    return this.#options.intervalMs ?? 1000;
  }

  async #authorized(request: Request): Promise<boolean> {
    const token = this.#options.token;
    if (token === undefined) return true;
    const header = request.headers.get("authorization");
    if (header?.startsWith("Bearer ")) return sameText(header.slice(7).trim(), token);
    const cookie = readCookie(request.headers.get("cookie"), COOKIE);
    return cookie !== undefined && sameText(cookie, await this.#cookieValue!);
  }

  /** The sign-in form's answer: a cookie holding the token's hash, and back to the page. */
  async #login(request: Request): Promise<Response> {
    if (this.#options.token === undefined) return redirect("/");
    let given = "";
    try {
      given = String((await request.formData()).get("token") ?? "");
    } catch { /* not a form */ }
    if (!sameText(given, this.#options.token)) {
      return page(LOGIN_PAGE.replace("<!--error-->", "<p class=error>Wrong token.</p>"), 401);
    }
    const cookie = `${COOKIE}=${await this.#cookieValue}; Path=/; HttpOnly; SameSite=Strict`;
    return redirect("/", { "set-cookie": cookie });
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
            send("update", this.update());
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
  update(): DashboardUpdate {
    const live = this.#source.live();
    return {
      t: Date.now(),
      state: this.#source.state(),
      summary: live?.summary() ?? null,
      point: live ? live.point(live.second - 1) : null,
    };
  }

  /**
   * "Try it": `{"project","session_id","message"}` in, lines of reply bodies
   * (`delta`, then `done` or `error`) out, as an MQTT client would get them.
   */
  async #tryIt(request: Request): Promise<Response> {
    // A page of another origin may post here (the browser sends no preflight for a form):
    // only JSON from this page's own origin is taken.
    const origin = request.headers.get("origin");
    const host = request.headers.get("host");
    if (origin !== null && (host === null || new URL(origin).host !== host)) {
      return text("try it takes requests from this page only\n", 403);
    }
    if (!request.headers.get("content-type")?.startsWith("application/json")) {
      return text("send JSON: {project, session_id, message}\n", 415);
    }
    let raw: Record<string, unknown>;
    try {
      raw = await request.json();
    } catch {
      return json({ type: "error", error: { code: "invalid_request", message: "bad JSON" } }, 400);
    }
    const { project, session_id: sessionId, message } = raw ?? {};
    if (typeof project !== "string" || !this.#source.projects.includes(project)) {
      return json(
        { type: "error", error: { code: "unknown_project", message: "pick a served project" } },
        400,
      );
    }
    if (typeof sessionId !== "string" || !DASHBOARD_SESSION.test(sessionId)) {
      return json({
        type: "error",
        error: { code: "invalid_request", message: "session_id must be dashboard-xxxxxxxx" },
      }, 400);
    }
    const payload = encoder.encode(JSON.stringify({ session_id: sessionId, message }));
    const outcome = parseRequest(
      payload,
      project,
      `${project}/assistant_response/`,
      this.#source.limits,
    );
    if (!outcome.ok) {
      return json({
        type: "error",
        error: { code: outcome.error.code, message: outcome.error.message },
      }, 400);
    }
    let cancel: (() => void) | undefined;
    let finished = false;
    const body = new ReadableStream<Uint8Array>({
      start: (controller) => {
        const deliver = (reply: ReplyBody) => {
          if (finished) return;
          try {
            controller.enqueue(encoder.encode(JSON.stringify(reply) + "\n"));
            if (reply.type !== "delta") {
              finished = true;
              controller.close();
            }
          } catch { /* the page went away */ }
        };
        cancel = this.#source.ask(outcome.request, deliver);
        if (cancel === undefined) {
          deliver({
            type: "error",
            error: { code: "engine_unavailable", message: "the service is starting" },
          });
        }
      },
      cancel: () => {
        if (!finished) cancel?.();
        finished = true;
      },
    });
    return new Response(body, {
      headers: {
        "content-type": "application/x-ndjson; charset=utf-8",
        "cache-control": "no-store",
        ...SECURITY_HEADERS,
      },
    });
  }
}

const LOGIN_PAGE = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vllm-mqtt: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{font:16px system-ui,sans-serif;max-width:28rem;margin:4rem auto;padding:0 1rem}
input,button{font:inherit;padding:.4rem .6rem}.error{color:#b00020}</style></head>
<body><h1>vllm-mqtt</h1><p>This page needs the token set with <code>--dashboard-token</code>
(<code>VLLM_MQTT_DASHBOARD_TOKEN</code>).</p><!--error-->
<form method="post" action="/dashboard/login"><input type="password" name="token"
 autocomplete="current-password" placeholder="token" required autofocus> <button>Sign in</button></form>
</body></html>
`;

function sameText(a: string, b: string): boolean {
  const x = encoder.encode(a);
  const y = encoder.encode(b);
  let differ = x.length ^ y.length;
  for (let i = 0; i < Math.max(x.length, y.length); i++) differ |= (x[i] ?? 0) ^ (y[i] ?? 0);
  return differ === 0;
}

async function sha256Hex(text: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", encoder.encode(`vllm-mqtt:${text}`));
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

function readCookie(header: string | null, name: string): string | undefined {
  for (const part of header?.split(";") ?? []) {
    const [key, ...value] = part.trim().split("=");
    if (key === name) return value.join("=");
  }
  return undefined;
}

function asset(body: string | Uint8Array, type: string): Response {
  return new Response(body as BodyInit, {
    headers: { "content-type": type, "cache-control": "no-cache", ...SECURITY_HEADERS },
  });
}

function page(html: string, status: number, headers: Record<string, string> = {}): Response {
  return new Response(html, {
    status,
    headers: { "content-type": "text/html; charset=utf-8", ...SECURITY_HEADERS, ...headers },
  });
}

function text(body: string, status: number, headers: Record<string, string> = {}): Response {
  return new Response(body, {
    status,
    headers: { "content-type": "text/plain; charset=utf-8", ...headers },
  });
}

function json(body: unknown, status = 200): Response {
  return Response.json(body, { status, headers: { "cache-control": "no-store" } });
}

function redirect(location: string, headers: Record<string, string> = {}): Response {
  return new Response(null, { status: 303, headers: { location, ...headers } });
}

/** The parts of a running service the page reports on, as they come up. */
export interface ServiceParts {
  readonly engine?: { readonly restarts: Readonly<Record<string, number>> };
  readonly engineHealth?: { readonly state: string; readonly outages: number };
  readonly storageHealth?: { readonly available: boolean; readonly reason: string | undefined };
  readonly client?: { readonly connected: boolean };
  readonly serving?: {
    readonly gateway: {
      readonly queued: number;
      readonly inFlight: number;
      ask(request: ChatRequest, deliver: (body: ReplyBody) => void): () => void;
    };
    readonly directory: { readonly size: number };
    readonly live: LiveStats;
  };
}

/** The page of a service with `config`, reading `parts` as they come up. */
export function serviceDashboard(config: Config, parts: Readonly<ServiceParts>): Dashboard {
  const startedAt = Date.now();
  return new Dashboard({
    projects: config.projects,
    limits: config,
    live: () => parts.serving?.live,
    ask: (request, deliver) => parts.serving?.gateway.ask(request, deliver),
    state: () => {
      const engineState = parts.engineHealth?.state ?? "starting";
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
          outages: parts.engineHealth?.outages ?? 0,
          restarts: parts.engine?.restarts ?? {},
        },
        broker: {
          url: config.mqttUrl === undefined ? "localhost (or embedded)" : redact(config.mqttUrl),
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
