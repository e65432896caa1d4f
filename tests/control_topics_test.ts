/**
 * The control topics in the secure deployment (the shipped ACL and password
 * file, `--session-topics-only`): a command is carried out only as it was
 * written (a payload that is not a JSON object is refused, never read as
 * "every session"), and a command for every session of a project needs the
 * operator token, not only the broker's ACL. A real mosquitto, the service as
 * a child process, an engine that repeats what it is told. And in the open
 * deployment, a session id a command's payload names that is not one is
 * never made into a reply topic.
 */

import { deepEqual, equal, match } from "node:assert/strict";
import { mosquittoTest as test, type TestClient, withService } from "./_helpers.ts";
import { errorCode, type SecureDeployment, withSecureDeployment } from "./_secure_deployment.ts";

const TOKEN = "operator-Token-0123456789";

/** Bob's turn `n` on `project`; what the engine was sent for it (roles and texts). */
async function bobSays(d: SecureDeployment, bob: TestClient, project: string, n: number) {
  await bob.send(`${project}/user_input/bob`, { message: `bob ${n}`, request_id: `b${n}` });
  equal((await bob.final("bob", `b${n}`)).json!.response, `bob ${n}`);
  return d.engine.requests.at(-1)!.messages.map((m) => [m.role, m.content]);
}

/** The acknowledgement of the next project-wide command, on `{project}/assistant_response/all`. */
async function acknowledged(d: SecureDeployment, project: string) {
  const ack = await d.watcher.next((m) => m.topic === `${project}/assistant_response/all`);
  d.watcher.received.splice(d.watcher.received.indexOf(ack), 1);
  return ack;
}

test("a clear, delete or template payload that is not a JSON object is refused, never read as all", async () => {
  await withSecureDeployment([], async (d) => {
    const bob = await d.login("bob");
    await bob.subscribe("maze/assistant_response/bob");
    const first = await bobSays(d, bob, "maze", 1);
    const operator = await d.login("operator");
    for (
      const [topic, payload] of [
        ["maze/clear_history", "not json"],
        ["maze/delete_session", "[1]"],
        ["maze/template", '"You are PWNED"'],
      ]
    ) {
      await operator.send(topic, payload);
      const ack = await acknowledged(d, "maze");
      match(ack.text, /^Error: the \w+ payload must be a JSON object \(or empty\)/);
    }
    // Bob's history and the project's prompt are intact.
    deepEqual(await bobSays(d, bob, "maze", 2), [
      ...first,
      ["assistant", "bob 1"],
      ["user", "bob 2"],
    ]);
  });
});

test("under --session-topics-only, project-wide commands need the operator token", async () => {
  await withSecureDeployment([], async (d) => {
    const bob = await d.login("bob");
    await bob.subscribe("general/assistant_response/bob");
    const [prompt] = await bobSays(d, bob, "general", 1);
    match(String(prompt[1]), /^# General assistant/);
    const operator = await d.login("operator");
    // No token configured: refused, however the command names every session.
    for (
      const [topic, payload] of [["general/template", { template: "Obey." }], [
        "general/template/all",
        { template: "Obey." },
      ], ["general/clear_history", {}]] as const
    ) {
      await operator.send(topic, { ...payload, session_id: "all" });
      const ack = await acknowledged(d, "general");
      equal(errorCode(ack), "forbidden", ack.text);
      match(ack.text, /need an operator token \(--operator-token\), and none is set/);
    }
    // A command for one session is the ACL's to allow (only operators may publish there).
    await operator.send("general/clear_history/bob", { session_id: "bob" });
    const cleared = await d.watcher.next((m) =>
      m.topic === "general/assistant_response/bob" && m.json?.finish_reason === "control"
    );
    match(String(cleared.json!.response), /History cleared for session bob/);
    deepEqual(await bobSays(d, bob, "general", 2), [prompt, ["user", "bob 2"]]);
  });
});

test("with --operator-token, a project-wide command carries it or is refused", async () => {
  await withSecureDeployment([], async (d) => {
    const bob = await d.login("bob");
    await bob.subscribe("general/assistant_response/bob");
    const [prompt] = await bobSays(d, bob, "general", 1);
    const operator = await d.login("operator");
    await operator.send("general/template", { template: "Obey.", session_id: "all" });
    match((await acknowledged(d, "general")).text, /need the operator token \('operator_token'\)/);
    await operator.send("general/template", {
      template: "Obey.",
      session_id: "all",
      operator_token: "operator-Token-guessed!!",
    });
    equal(errorCode(await acknowledged(d, "general")), "forbidden");
    deepEqual((await bobSays(d, bob, "general", 2)).slice(0, 2), [prompt, ["user", "bob 1"]]);
    await operator.send("general/template", {
      template: "You are the project-wide prompt.",
      session_id: "all",
      operator_token: TOKEN,
    });
    match(String((await acknowledged(d, "general")).json!.response), /set for project general/);
    deepEqual(await bobSays(d, bob, "general", 3), [
      ["system", "You are the project-wide prompt."],
      ["user", "bob 3"],
    ]);
    equal(d.service.log().includes(TOKEN), false, "the token was logged");
  }, { VLLM_MQTT_OPERATOR_TOKEN: TOKEN });
});

test("a command naming a session id that could not be one is counted, not answered on a topic made of it", async () => {
  await withService({}, async ({ client, service }) => {
    // As a topic, `maze/assistant_response/x/#` holds a wildcard: publishing there, the
    // service would be disconnected by the broker (again at each redelivery).
    await client.send("maze/clear_history", { session_id: "x/#" });
    await client.send("maze/delete_session", { sessionId: "a+b" });
    // A session id on the topic is still answered where it came from.
    await client.send("maze/clear_history/a b", {});
    const invalid = await client.next((m) => m.topic === "maze/assistant_response/a b");
    equal(invalid.text, 'Error: session id "a b" is not valid');
    await client.send("general/user_input", { session_id: "s1", message: "hi", format: "json" });
    match(String((await client.final("s1")).json!.response), /you said "hi"/);
    equal(service.log().match(/protocol error|Lost the connection/g), null, service.log());
    deepEqual(
      client.received.filter((m) => m.topic.startsWith("maze/")).map((m) => m.topic),
      ["maze/assistant_response/a b"],
    );
  });
});
