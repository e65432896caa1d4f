/**
 * The secure deployment the docs describe, for the security tests: a real
 * mosquitto with the shipped ACL (deploy/mosquitto/acl) and a password file
 * made here (users vllm-mqtt, operator, alice, bob), the service as a child
 * process with `--session-topics-only`, and an engine that repeats what it is
 * told (the last user message, streamed as vLLM streams), so that a client
 * controls the model's answer word for word, as an attacker prompting a real
 * model can.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  type Mosquitto,
  removeTempDir,
  ROOT,
  type ServiceProcess,
  startMosquitto,
  startService,
  tempDir,
  TestClient,
} from "./_helpers.ts";

/** A chat completion request as the echo engine recorded it. */
export interface EchoRequest {
  readonly messages: { role: string; content: string }[];
}

/** An OpenAI-compatible engine whose answer is the last user message, word for word. */
export interface EchoEngine {
  readonly url: string;
  /** Every chat completion request received, in order. */
  readonly requests: EchoRequest[];
  close(): Promise<void>;
}

/** Starts an {@linkcode EchoEngine} on a free port. */
export function startEchoEngine(): EchoEngine {
  const requests: EchoRequest[] = [];
  const event = (data: unknown) => `data: ${JSON.stringify(data)}\n\n`;
  const server = Deno.serve(
    { port: 0, hostname: "127.0.0.1", onListen: () => {} },
    async (request) => {
      const { pathname } = new URL(request.url);
      if (pathname === "/v1/models") {
        return Response.json({ object: "list", data: [{ id: "echo", object: "model" }] });
      }
      if (pathname !== "/v1/chat/completions") return new Response("no", { status: 404 });
      const body = await request.json() as EchoRequest;
      requests.push(body);
      const text = String(body.messages.findLast((m) => m.role === "user")?.content ?? "");
      const base = {
        id: "chatcmpl-echo",
        object: "chat.completion.chunk",
        created: 0,
        model: "echo",
      };
      const words = text.match(/\S+\s*|\s+/g) ?? [];
      const sse = [
        event({ ...base, choices: [{ index: 0, delta: { role: "assistant", content: "" } }] }),
        ...words.map((word) =>
          event({ ...base, choices: [{ index: 0, delta: { content: word }, finish_reason: null }] })
        ),
        event({ ...base, choices: [{ index: 0, delta: {}, finish_reason: "stop" }] }),
        event({
          ...base,
          choices: [],
          usage: {
            prompt_tokens: 10,
            completion_tokens: words.length,
            total_tokens: 10 + words.length,
          },
        }),
        "data: [DONE]\n\n",
      ].join("");
      return new Response(sse, { headers: { "content-type": "text/event-stream" } });
    },
  );
  const { port } = server.addr as Deno.NetAddr;
  return { url: `http://127.0.0.1:${port}/v1`, requests, close: () => server.shutdown() };
}

/** The users of the password file, and their passwords. */
export const SECRETS = {
  "vllm-mqtt": "svc-Secret-1",
  operator: "op-Secret-2",
  alice: "alice-Secret-3",
  bob: "bob-Secret-4",
} as const;

/** What {@linkcode withSecureDeployment} gives a test. */
export interface SecureDeployment {
  broker: Mosquitto;
  engine: EchoEngine;
  service: ServiceProcess;
  /** A client logged in as `user` (MQTT 5 unless `protocolVersion` says 4). */
  login(user: keyof typeof SECRETS, protocolVersion?: 4 | 5): Promise<TestClient>;
  /** Logged in as operator, subscribed to every topic (`#`) from the start. */
  watcher: TestClient;
}

/**
 * Runs `fn` against the secure deployment: the service with `--projects=maze,general`,
 * `--session-topics-only` and `args`; all of it goes when `fn` ends.
 */
export async function withSecureDeployment(
  args: string[],
  fn: (d: SecureDeployment) => Promise<void>,
  env: Record<string, string> = {},
): Promise<void> {
  const dir = await tempDir("vllm-mqtt-acl-");
  let first = true;
  for (const [user, password] of Object.entries(SECRETS)) {
    const out = await new Deno.Command("mosquitto_passwd", {
      args: [...(first ? ["-c"] : []), "-b", `${dir}/passwd`, user, password],
      stdout: "null",
      stderr: "piped",
    }).output();
    assert(out.success, new TextDecoder().decode(out.stderr));
    first = false;
  }
  // mosquitto started as root drops to its own user, which must be able to read these.
  await Deno.chmod(dir, 0o755);
  await Deno.chmod(`${dir}/passwd`, 0o644);
  const broker = await startMosquitto([
    "allow_anonymous false",
    `password_file ${dir}/passwd`,
    `acl_file ${ROOT}deploy/mosquitto/acl`,
  ]);
  const engine = startEchoEngine();
  const dataDir = await tempDir("vllm-mqtt-data-");
  const clients: TestClient[] = [];
  let service: ServiceProcess | undefined;
  try {
    // As the shipped deploy files run it.
    service = await startService([
      "--engine=url",
      `--engine-url=${engine.url}`,
      `--mqtt-url=${broker.url}`,
      `--data-dir=${dataDir}`,
      "--projects=maze,general",
      "--mqtt-username=vllm-mqtt",
      "--session-topics-only",
      ...args,
    ], { env: { VLLM_MQTT_MQTT_PASSWORD: SECRETS["vllm-mqtt"], ...env } });
    const login = async (user: keyof typeof SECRETS, protocolVersion: 4 | 5 = 5) => {
      const client = await TestClient.connect(broker.url, {
        username: user,
        password: SECRETS[user],
        protocolVersion,
      });
      clients.push(client);
      return client;
    };
    const watcher = await login("operator");
    await watcher.subscribe("#");
    await fn({ broker, engine, service, login, watcher });
  } catch (error) {
    if (service) console.error(`--- service log ---\n${service.log().slice(-4000)}`);
    throw error;
  } finally {
    for (const client of clients) await client.close();
    await service?.stop();
    await engine.close();
    await broker.close();
    await removeTempDir(dir);
    await removeTempDir(dataDir);
  }
}

/** The error code of a reply, if it is an error. */
export const errorCode = (m: { json?: Record<string, unknown> }) =>
  (m.json?.error as { code?: string } | undefined)?.code;
