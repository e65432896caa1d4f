/**
 * Who may talk to the operator's HTTP endpoint, by what the browser says of
 * a request: its Host, its Origin and its `Sec-Fetch-Site`.
 *
 * - **DNS rebinding**: a web page at `rebind.evil.example` whose name an
 *   attacker then points at 127.0.0.1 is, to the browser, its own origin: its
 *   requests reach the endpoint with `Host: rebind.evil.example`. So the
 *   endpoint answers only to Host names it knows: IP addresses (a browser
 *   sends one only when it was given one), `localhost` and its subdomains,
 *   the name it listens on, and those of `--http-allowed-hosts`.
 * - **Cross-site requests**: a page elsewhere may post a form here, or fetch
 *   with an `Origin` of its own, or of `null` (a sandboxed frame, a file):
 *   any Origin other than the request's own, and any request the browser
 *   marks as coming from another site (other than a link followed to the
 *   page), is refused with a 403.
 *
 * @module
 */

import { plainText } from "./_util.ts";

/** Options of {@linkcode RequestOrigin}. */
export interface RequestOriginOptions {
  /** The address the endpoint listens on (`--http-host`): a name there is known. */
  readonly listenHost: string;
  /**
   * Further Host names the endpoint answers to (`--http-allowed-hosts`), e.g.
   * the name Prometheus scrapes it by. A leading `.` allows every subdomain.
   * @default {[]}
   */
  readonly allowedHosts?: readonly string[];
}

/** Refuses requests of unknown Host names, other origins and other sites. */
export class RequestOrigin {
  readonly #names: ReadonlySet<string>;
  readonly #suffixes: readonly string[];

  constructor(options: RequestOriginOptions) {
    const allowed = (options.allowedHosts ?? []).map((name) => name.toLowerCase());
    this.#names = new Set([
      "localhost",
      options.listenHost.toLowerCase(),
      ...allowed.filter((name) => !name.startsWith(".")),
    ]);
    this.#suffixes = [".localhost", ...allowed.filter((name) => name.startsWith("."))];
  }

  /** The answer refusing `request`, or undefined when it may be served. */
  refusal(request: Request): Response | undefined {
    const host = request.headers.get("host");
    if (host === null || !this.#knownHost(host)) {
      return plainText(
        "unknown Host: this endpoint answers to localhost, IP addresses and --http-allowed-hosts\n",
        403,
      );
    }
    if (!sameOrigin(request)) return plainText("requests from other origins are refused\n", 403);
    const site = request.headers.get("sec-fetch-site");
    const followedLink = request.headers.get("sec-fetch-mode") === "navigate" &&
      (request.method === "GET" || request.method === "HEAD");
    if ((site === "cross-site" || site === "same-site") && !followedLink) {
      return plainText("requests from other sites are refused\n", 403);
    }
    return undefined;
  }

  #knownHost(host: string): boolean {
    const name = hostName(host);
    if (name === undefined) return false;
    if (isIpAddress(name) || this.#names.has(name)) return true;
    return this.#suffixes.some((suffix) => name.endsWith(suffix));
  }
}

/**
 * Whether a request is of its own origin: no Origin header (not sent by a
 * browser, or a link followed), or one naming the request's own Host. A
 * `null` or malformed Origin is another origin.
 */
export function sameOrigin(request: Request): boolean {
  const origin = request.headers.get("origin");
  if (origin === null) return true;
  const host = request.headers.get("host");
  return host !== null && originHost(origin) === host.toLowerCase();
}

/** The name of a Host header (`name:port`, `[v6]:port`), lower case; undefined if malformed. */
function hostName(host: string): string | undefined {
  try {
    return new URL(`http://${host}`).hostname.toLowerCase();
  } catch {
    return undefined;
  }
}

/** `host[:port]` of an Origin header; undefined for `null` or anything not a URL. */
function originHost(origin: string): string | undefined {
  try {
    const url = new URL(origin);
    return url.protocol === "http:" || url.protocol === "https:"
      ? url.host.toLowerCase()
      : undefined;
  } catch {
    return undefined;
  }
}

/** Whether a URL's hostname is an IPv4 or bracketed IPv6 address. */
function isIpAddress(name: string): boolean {
  return /^\d{1,3}(\.\d{1,3}){3}$/.test(name) || /^\[[0-9a-f:.]+\]$/.test(name);
}
