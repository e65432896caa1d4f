/**
 * The operator's HTTP endpoint: `/healthz` (the process is alive), `/readyz`
 * (broker connected, engine taking requests, session store writable), `/metrics` (Prometheus) and
 * `/status` (JSON).
 *
 * @module
 */

import { logger } from "../log.ts";
import { RequestOrigin } from "./request_origin.ts";

/** What the endpoint reports on. */
export interface HttpEndpointSource {
  /** Whether the service can answer requests now, and if not, why. */
  readiness(): {
    readonly ready: boolean;
    readonly broker: boolean;
    readonly engine: boolean;
    /** Whether the session store can be written (not: a full disk). */
    readonly storage?: boolean;
    /** Why it is not ready, when it can tell. */
    readonly reason?: string;
  };
  metrics(): string;
  status(): unknown;
  /**
   * Paths served by another part (the live page), asked first: a response, or
   * undefined for a path it does not serve. `client`: the caller's address.
   */
  page?(request: Request, client: string): Promise<Response> | undefined;
}

/** A listening endpoint. */
export interface HttpEndpoint {
  readonly port: number;
  close(): Promise<void>;
}

/** Where the endpoint listens, and to whom it answers. */
export interface HttpEndpointOptions {
  readonly hostname: string;
  /** The port; 0 picks a free one. */
  readonly port: number;
  /**
   * Host names answered beside localhost, IP addresses and `hostname`
   * (`--http-allowed-hosts`).
   * @default {[]}
   */
  readonly allowedHosts?: readonly string[];
}

const log = logger("http");

/**
 * Serves the endpoint. Every request passes {@linkcode RequestOrigin} first:
 * an unknown Host name (DNS rebinding) or a request of another origin or
 * site is a 403, whatever its path.
 */
export function serveHttpEndpoint(
  options: HttpEndpointOptions,
  source: HttpEndpointSource,
): HttpEndpoint {
  const { hostname, port } = options;
  const origin = new RequestOrigin({ listenHost: hostname, allowedHosts: options.allowedHosts });
  const server = Deno.serve({
    hostname,
    port,
    onListen: () => {},
    // A failure is the request's alone: logged by its message (no stack trace of ours for
    // whoever can reach the port to fill the log with), answered 500.
    onError: (error) => {
      log.warn("HTTP request failed: {message}", { message: String(error) });
      return new Response("internal error\n", { status: 500 });
    },
  }, (request, info) => {
    const refused = origin.refusal(request);
    if (refused) return refused;
    const page = source.page?.(request, info.remoteAddr.hostname);
    if (page) return page;
    if (request.method !== "GET" && request.method !== "HEAD") {
      return new Response("method not allowed\n", { status: 405, headers: { allow: "GET" } });
    }
    switch (new URL(request.url).pathname) {
      case "/healthz":
        return new Response("ok\n");
      case "/readyz": {
        const readiness = source.readiness();
        return Response.json(readiness, { status: readiness.ready ? 200 : 503 });
      }
      case "/metrics":
        return new Response(source.metrics(), {
          headers: { "content-type": "text/plain; version=0.0.4; charset=utf-8" },
        });
      case "/status":
        return Response.json(source.status());
      default:
        return new Response("not found: try /healthz, /readyz, /metrics or /status\n", {
          status: 404,
        });
    }
  });
  const bound = (server.addr as Deno.NetAddr).port;
  log.info("HTTP endpoint on http://{hostname}:{port} (/healthz /readyz /metrics /status)", {
    hostname,
    port: bound,
  });
  return { port: bound, close: () => server.shutdown() };
}
