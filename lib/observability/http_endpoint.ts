/**
 * The operator's HTTP endpoint: `/healthz` (the process is alive), `/readyz`
 * (broker connected, engine taking requests, session store writable), `/metrics` (Prometheus) and
 * `/status` (JSON).
 *
 * @module
 */

import { logger } from "../log.ts";

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
   * undefined for a path it does not serve.
   */
  page?(request: Request): Promise<Response> | undefined;
}

/** A listening endpoint. */
export interface HttpEndpoint {
  readonly port: number;
  close(): Promise<void>;
}

const log = logger("http");

/** Serves the endpoint on `hostname:port` (port 0 picks a free one). */
export function serveHttpEndpoint(
  hostname: string,
  port: number,
  source: HttpEndpointSource,
): HttpEndpoint {
  const server = Deno.serve({ hostname, port, onListen: () => {} }, (request) => {
    const page = source.page?.(request);
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
