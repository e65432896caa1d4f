/**
 * Security: TLS with a CA and client certificates, username and password,
 * the ACL from deploy/ (a client reads only its own session's answers), and
 * no secret in any log line. The certificates are made by the test (openssl).
 */

import assert, { equal } from "node:assert/strict";
import { startSimulator } from "../lib/engine/simulator.ts";
import {
  freePort,
  HAS_MOSQUITTO,
  removeTempDir,
  ROOT,
  startMosquitto,
  startService,
  tempDir,
  TestClient,
} from "./_helpers.ts";

const HAS_OPENSSL = await new Deno.Command("openssl", { args: ["version"], stdout: "null" })
  .output().then((out) => out.success, () => false);

async function run(command: string, args: string[], cwd: string): Promise<void> {
  const out = await new Deno.Command(command, { args, cwd, stdout: "null", stderr: "piped" })
    .output();
  if (!out.success) throw new Error(`${command} failed: ${new TextDecoder().decode(out.stderr)}`);
}

/** A CA, a server certificate for 127.0.0.1 and a client certificate, in `dir`. */
async function makeCertificates(dir: string): Promise<void> {
  const openssl = (...args: string[]) => run("openssl", args, dir);
  await openssl(
    "req",
    "-x509",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-days",
    "1",
    "-subj",
    "/CN=test-ca",
    "-keyout",
    "ca.key",
    "-out",
    "ca.crt",
  );
  for (const name of ["server", "client"]) {
    await openssl(
      "req",
      "-newkey",
      "rsa:2048",
      "-nodes",
      "-subj",
      `/CN=${name}`,
      "-keyout",
      `${name}.key`,
      "-out",
      `${name}.csr`,
    );
    await Deno.writeTextFile(
      `${dir}/${name}.ext`,
      name === "server" ? "subjectAltName=IP:127.0.0.1\n" : "extendedKeyUsage=clientAuth\n",
    );
    await openssl(
      "x509",
      "-req",
      "-in",
      `${name}.csr`,
      "-CA",
      "ca.crt",
      "-CAkey",
      "ca.key",
      "-CAcreateserial",
      "-days",
      "1",
      "-extfile",
      `${name}.ext`,
      "-out",
      `${name}.crt`,
    );
  }
}

Deno.test({
  name:
    "TLS, passwords and the deploy/ ACL: each client reads only its own answers; no secret is logged",
  ignore: !HAS_MOSQUITTO || !HAS_OPENSSL,
  fn: async () => {
    const dir = await tempDir("vllm-mqtt-tls-");
    await makeCertificates(dir);
    const secrets = { "vllm-mqtt": "svc-Secret-1", alice: "alice-Secret-2", bob: "bob-Secret-3" };
    await run("mosquitto_passwd", ["-c", "-b", "passwd", "vllm-mqtt", secrets["vllm-mqtt"]], dir);
    for (const user of ["alice", "bob"] as const) {
      await run("mosquitto_passwd", ["-b", "passwd", user, secrets[user]], dir);
    }
    // mosquitto started as root drops to its own user, which must be able to read these.
    await Deno.chmod(dir, 0o755);
    for await (const file of Deno.readDir(dir)) await Deno.chmod(`${dir}/${file.name}`, 0o644);
    const port = freePort();
    const broker = await startMosquitto([
      `listener ${port} 127.0.0.1`,
      `cafile ${dir}/ca.crt`,
      `certfile ${dir}/server.crt`,
      `keyfile ${dir}/server.key`,
      "require_certificate true",
      "allow_anonymous false",
      `password_file ${dir}/passwd`,
      `acl_file ${ROOT}deploy/mosquitto/acl`,
    ], port);
    const engineKey = "engine-Secret-4";
    const sim = await startSimulator({ ttftMs: 5, itlMs: 1, apiKey: engineKey });
    const dataDir = await tempDir("vllm-mqtt-data-");
    const url = `mqtts://127.0.0.1:${port}`;
    const service = await startService([
      "--engine=url",
      `--engine-url=${sim.url}`,
      `--mqtt-url=${url}`,
      `--data-dir=${dataDir}`,
      "--projects=maze",
      "--mqtt-username=vllm-mqtt",
      `--tls-ca=${dir}/ca.crt`,
      `--tls-cert=${dir}/client.crt`,
      `--tls-key=${dir}/client.key`,
      "--log-level=debug",
      // As the shipped deploy files run it with their ACL.
      "--session-topics-only",
    ], {
      env: {
        VLLM_MQTT_MQTT_PASSWORD: secrets["vllm-mqtt"],
        VLLM_MQTT_ENGINE_API_KEY: engineKey,
      },
    });
    const tls = {
      ca: await Deno.readTextFile(`${dir}/ca.crt`),
      cert: await Deno.readTextFile(`${dir}/client.crt`),
      key: await Deno.readTextFile(`${dir}/client.key`),
    };
    const alice = await TestClient.connect(url, {
      ...tls,
      username: "alice",
      password: secrets.alice,
    });
    const bob = await TestClient.connect(url, { ...tls, username: "bob", password: secrets.bob });
    try {
      // Without a certificate, or with a wrong password, there is no way in.
      await assert.rejects(
        TestClient.connect(url, {
          ca: tls.ca,
          username: "bob",
          password: secrets.bob,
          reconnectPeriod: 0,
        }),
      );
      await assert.rejects(
        TestClient.connect(url, { ...tls, username: "bob", password: "guess", reconnectPeriod: 0 }),
      );

      await alice.subscribe("maze/assistant_response/#"); // asks for everyone's answers
      await bob.subscribe("maze/assistant_response/bob");
      await bob.send("maze/user_input/bob", { session_id: "bob", message: "my secret plan" });
      equal((await bob.final("bob")).json!.type, "done");
      // Alice's own answers reach her (through her pattern in the ACL)...
      await alice.subscribe("maze/assistant_response/alice");
      await alice.send("maze/user_input/alice", {
        session_id: "alice",
        message: "again",
        request_id: "a2",
      });
      equal((await alice.final("alice", "a2")).json!.type, "done");
      // ...and nothing of Bob's ever reached her.
      equal(alice.received.filter((m) => m.topic.endsWith("/bob")).length, 0);
    } finally {
      await alice.close();
      await bob.close();
      await service.stop();
      await sim.close();
      await broker.close();
    }
    for (const secret of [...Object.values(secrets), engineKey]) {
      assert(!service.log().includes(secret), `a secret was logged: ${secret}`);
    }
    await removeTempDir(dir);
    await removeTempDir(dataDir);
  },
});
