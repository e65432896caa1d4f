/**
 * The live page's sign-in, in process: the bearer token, the form, and the
 * cookie it sets (a hash of the token, never the token).
 */

import assert, { equal, match } from "node:assert/strict";
import { DashboardAuth } from "../../lib/observability/dashboard_auth.ts";

const URL_ROOT = "http://127.0.0.1:8080";

const get = (path: string, headers: Record<string, string> = {}) =>
  new Request(`${URL_ROOT}${path}`, { headers });

const signIn = (auth: DashboardAuth, token: string) =>
  auth.login(
    new Request(`${URL_ROOT}/dashboard/login`, {
      method: "POST",
      body: new URLSearchParams({ token }),
    }),
  );

Deno.test("dashboard auth: without a token everything is open and the form only goes back", async () => {
  const auth = new DashboardAuth(undefined);
  equal(await auth.authorized(get("/")), true);
  const answer = await signIn(auth, "anything");
  equal(answer.status, 303);
  equal(answer.headers.get("location"), "/");
  equal(answer.headers.get("set-cookie"), null);
});

Deno.test("dashboard auth: the bearer token, exactly", async () => {
  const auth = new DashboardAuth("s3cret-token");
  equal(await auth.authorized(get("/")), false);
  equal(await auth.authorized(get("/", { authorization: "Bearer s3cret-token" })), true);
  equal(await auth.authorized(get("/", { authorization: "Bearer s3cret-toke" })), false);
  equal(await auth.authorized(get("/", { authorization: "Bearer s3cret-token!" })), false);
  equal(await auth.authorized(get("/", { authorization: "Basic s3cret-token" })), false);
});

Deno.test("dashboard auth: the form sets a cookie of the token's hash, which then lets in", async () => {
  const auth = new DashboardAuth("s3cret-token");
  const wrong = await signIn(auth, "guess");
  equal(wrong.status, 401);
  match(await wrong.text(), /Wrong token/);
  const right = await signIn(auth, "s3cret-token");
  equal(right.status, 303);
  const cookie = right.headers.get("set-cookie")!;
  match(cookie, /^vllm_mqtt_dashboard=[0-9a-f]{64}; Path=\/; HttpOnly; SameSite=Strict$/);
  assert(!cookie.includes("s3cret-token"));
  const pair = cookie.split(";")[0];
  equal(await auth.authorized(get("/", { cookie: `theme=dark; ${pair}` })), true);
  equal(await auth.authorized(get("/", { cookie: "vllm_mqtt_dashboard=s3cret-token" })), false);
  // The hash is the token's: another service's cookie does not open this one.
  equal(await new DashboardAuth("other-token").authorized(get("/", { cookie: pair })), false);
});

Deno.test("dashboard auth: refused, the page shows the form; anything else a plain 401", async () => {
  const auth = new DashboardAuth("s3cret-token");
  const form = auth.refusal(get("/"), "/");
  equal(form.status, 401);
  match(form.headers.get("content-type")!, /^text\/html/);
  equal(form.headers.get("x-frame-options"), "DENY");
  match(await form.text(), /action="\/dashboard\/login"/);
  const plain = auth.refusal(get("/dashboard/events"), "/dashboard/events");
  equal(plain.status, 401);
  equal(plain.headers.get("www-authenticate"), 'Bearer realm="vllm-mqtt"');
  match(await plain.text(), /Authorization: Bearer TOKEN/);
});

Deno.test("dashboard auth: wrong tokens are throttled per client; the form is too", async () => {
  const clock = { now: 0 };
  const auth = new DashboardAuth("s3cret-token", { now: () => clock.now });
  const guess = get("/", { authorization: "Bearer guess" });
  for (let i = 0; i < 10; i++) {
    equal(auth.throttled("10.0.0.1"), undefined, `guess ${i}`);
    equal(await auth.authorized(guess, "10.0.0.1"), false);
  }
  // The eleventh wrong token: from now on answered 429, unchecked, even the right token.
  equal(await auth.authorized(guess, "10.0.0.1"), false);
  const throttled = auth.throttled("10.0.0.1")!;
  equal(throttled.status, 429);
  equal(throttled.headers.get("retry-after"), "6");
  equal(
    (await auth.login(
      new Request(`${URL_ROOT}/dashboard/login`, {
        method: "POST",
        body: new URLSearchParams({ token: "s3cret-token" }),
      }),
      "10.0.0.1",
    )).status,
    429,
  );
  // Another client is not held up; nothing shown (the sign-in form) is not a guess.
  equal(auth.throttled("10.0.0.2"), undefined);
  for (let i = 0; i < 20; i++) equal(await auth.authorized(get("/"), "10.0.0.3"), false);
  equal(auth.throttled("10.0.0.3"), undefined);
  // Six seconds on, one more try.
  clock.now += 6000;
  equal(auth.throttled("10.0.0.1"), undefined);
  equal(
    await auth.authorized(get("/", { authorization: "Bearer s3cret-token" }), "10.0.0.1"),
    true,
  );
});
