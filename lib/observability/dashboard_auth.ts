/**
 * The live page's sign-in. With a token set, every part of the page needs
 * `Authorization: Bearer TOKEN` or the cookie the sign-in form sets; without
 * one, everything is open. The cookie holds a hash of the token, so the token
 * itself never sits in the browser, and tokens are compared in a time that
 * does not tell how much of a guess was right. Guessing is throttled: a client
 * (an address) that sent ten wrong tokens gets one more try each six seconds,
 * every other request answered 429 without its token being checked.
 *
 * @module
 */

import { LruMap } from "../_util.ts";
import { RateLimiter } from "../gateway/rate_limiter.ts";
import { page, plainText, redirect } from "./_util.ts";

const COOKIE = "vllm_mqtt_dashboard";
const CHALLENGE = { "www-authenticate": 'Bearer realm="vllm-mqtt"' };
const encoder = new TextEncoder();

/** Options of {@linkcode DashboardAuth}. */
export interface DashboardAuthOptions {
  /**
   * Wrong tokens a client (an address) may send at once; then one more each
   * `60 s / wrongTokens`, every other attempt answered 429 unchecked.
   * @default {10}
   */
  readonly wrongTokens?: number;
  /**
   * The clock, in milliseconds.
   * @default {performance.now}
   */
  readonly now?: () => number;
}

/** Who may see the live page. */
export class DashboardAuth {
  readonly #token: string | undefined;
  readonly #wrong: RateLimiter;
  /** When each throttled client may try again. */
  readonly #blockedUntil = new LruMap<string, number>(10_000);
  readonly #now: () => number;
  #cookieValue: Promise<string> | undefined;

  /** `token`: what every request must show; undefined: none needed. */
  constructor(token: string | undefined, options: DashboardAuthOptions = {}) {
    this.#token = token;
    this.#now = options.now ?? (() => performance.now());
    const burst = options.wrongTokens ?? 10;
    this.#wrong = new RateLimiter({ perMinute: burst, burst, now: this.#now });
  }

  /** SHA-256 of the token, as the cookie holds it: worked out once, when first needed. */
  #cookie(token: string): Promise<string> {
    return this.#cookieValue ??= sha256Hex(token);
  }

  /**
   * The answer to a request the token does not let through (`client` throttled, or no right
   * token shown: {@linkcode refusal}); undefined when it may go on.
   */
  async gate(request: Request, client: string, path: string): Promise<Response | undefined> {
    const throttled = this.throttled(client);
    if (throttled) return throttled;
    if (await this.authorized(request, client)) return undefined;
    return this.throttled(client) ?? this.refusal(request, path);
  }

  /**
   * The answer to `client` (its address) while it is throttled for sending
   * wrong tokens: a 429 with the seconds to wait, its token left unchecked.
   */
  throttled(client: string): Response | undefined {
    const until = this.#blockedUntil.get(client);
    if (until === undefined) return undefined;
    const wait = until - this.#now();
    if (wait <= 0) {
      this.#blockedUntil.delete(client);
      return undefined;
    }
    return plainText("too many wrong tokens: wait and try again\n", 429, {
      "retry-after": String(Math.ceil(wait / 1000)),
    });
  }

  /** Whether `request` shows the token (or no token is set); a wrong one counts against `client`. */
  async authorized(request: Request, client = ""): Promise<boolean> {
    const token = this.#token;
    if (token === undefined) return true;
    const header = request.headers.get("authorization");
    const cookie = readCookie(request.headers.get("cookie"), COOKIE);
    let right: boolean;
    if (header?.startsWith("Bearer ")) right = sameText(header.slice(7).trim(), token);
    else if (cookie !== undefined) right = sameText(cookie, await this.#cookie(token));
    else return false; // nothing shown: the sign-in form, not a guess
    if (!right) this.#failed(client);
    return right;
  }

  /**
   * The answer to a request that does not show the token: the sign-in form for
   * the page itself, a plain 401 for its files, stream and "try it".
   */
  refusal(request: Request, path: string): Response {
    if (path === "/" && request.method !== "POST") return page(LOGIN_PAGE, 401, CHALLENGE);
    return plainText("a token is needed: Authorization: Bearer TOKEN\n", 401, CHALLENGE);
  }

  /** The sign-in form's answer: a cookie holding the token's hash, and back to the page. */
  async login(request: Request, client = ""): Promise<Response> {
    if (this.#token === undefined) return redirect("/");
    const throttled = this.throttled(client);
    if (throttled) return throttled;
    let given = "";
    try {
      given = String((await request.formData()).get("token") ?? "");
    } catch { /* not a form */ }
    if (!sameText(given, this.#token)) {
      this.#failed(client);
      return page(LOGIN_PAGE.replace("<!--error-->", "<p class=error>Wrong token.</p>"), 401);
    }
    const cookie = `${COOKIE}=${await this.#cookie(
      this.#token,
    )}; Path=/; HttpOnly; SameSite=Strict`;
    return redirect("/", { "set-cookie": cookie });
  }

  /** A wrong token from `client`: past its allowance, it waits for the next one. */
  #failed(client: string): void {
    const wait = this.#wrong.take(client);
    if (wait > 0) this.#blockedUntil.set(client, this.#now() + wait);
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

/** Whether two texts are equal, in a time that depends on their lengths only. */
function sameText(a: string, b: string): boolean {
  const x = encoder.encode(a);
  const y = encoder.encode(b);
  let differ = x.length ^ y.length;
  for (let i = 0; i < Math.max(x.length, y.length); i++) differ |= (x[i] ?? 0) ^ (y[i] ?? 0);
  return differ === 0;
}

async function sha256Hex(value: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", encoder.encode(`vllm-mqtt:${value}`));
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

function readCookie(header: string | null, name: string): string | undefined {
  for (const part of header?.split(";") ?? []) {
    const [key, ...value] = part.trim().split("=");
    if (key === name) return value.join("=");
  }
  return undefined;
}
