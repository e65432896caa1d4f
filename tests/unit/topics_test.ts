/**
 * Topics: what each one is called, with and without a prefix and a share
 * group, what an incoming topic addresses, and which session ids may stand
 * in a topic level.
 */

import assert, { deepEqual, equal } from "node:assert/strict";
import { SESSION_ID_PATTERN, topicMatches, Topics } from "../../lib/protocol/topics.ts";

Deno.test("topics: the names a deployment uses, under its prefix (status and stats are not)", () => {
  const topics = new Topics("site1/", "vllm");
  equal(topics.input("maze"), "site1/maze/user_input");
  equal(topics.sessionInput("maze", "s1"), "site1/maze/user_input/s1");
  equal(topics.response("maze", "s1"), "site1/maze/assistant_response/s1");
  equal(topics.responseRoot("maze"), "site1/maze/assistant_response/");
  deepEqual(topics.control("maze", "template"), ["site1/maze/template", "site1/maze/template/+"]);
  equal(topics.newSession("maze"), "site1/maze/new_session/+");
  deepEqual(topics.state("maze"), ["site1/maze/state", "site1/maze/state/+"]);
  equal(topics.hint("maze", "s1"), "site1/maze/hint/s1");
  equal(topics.status, "vllm/status");
  equal(topics.stats, "vllm/stats");
  equal(topics.shared, false);
  equal(topics.subscription("site1/maze/user_input"), "site1/maze/user_input");
});

Deno.test("topics: in a share group, input is a shared subscription and the status is the instance's", () => {
  const topics = new Topics("", "vllm", "g", "box-2");
  equal(topics.shared, true);
  equal(topics.subscription("maze/user_input"), "$share/g/maze/user_input");
  equal(topics.status, "vllm/status/box-2");
  equal(topics.stats, "vllm/stats");
});

Deno.test("topics: parse names what an incoming topic addresses", () => {
  const topics = new Topics("p/", "vllm");
  deepEqual(topics.parse("p/maze/user_input"), {
    kind: "input",
    project: "maze",
    sessionId: undefined,
  });
  deepEqual(topics.parse("p/maze/user_input/s1"), {
    kind: "input",
    project: "maze",
    sessionId: "s1",
  });
  deepEqual(topics.parse("p/maze/state"), { kind: "state", project: "maze", sessionId: undefined });
  deepEqual(topics.parse("p/maze/state/s1"), { kind: "state", project: "maze", sessionId: "s1" });
  deepEqual(topics.parse("p/maze/new_session/n1"), {
    kind: "new_session",
    project: "maze",
    nonce: "n1",
  });
  deepEqual(topics.parse("p/maze/clear_history"), {
    kind: "control",
    project: "maze",
    command: "clear_history",
    sessionId: undefined,
  });
  deepEqual(topics.parse("p/maze/delete_session/s1"), {
    kind: "control",
    project: "maze",
    command: "delete_session",
    sessionId: "s1",
  });
  // Nothing of ours: another prefix, too many or too few levels, an unknown command.
  for (
    const topic of [
      "maze/user_input",
      "p/maze/user_input/s1/extra",
      "p/maze/new_session",
      "p/maze/state/s1/extra",
      "p/maze/assistant_response/s1",
      "p/maze/reboot",
      "p/maze",
    ]
  ) {
    equal(topics.parse(topic), undefined, topic);
  }
});

Deno.test("topics: a session id is 1 to 128 code points, each visible, never `all`", () => {
  for (
    const id of [
      "s",
      "ann@example.com",
      "default-1234abcd",
      "all-stars",
      "Ω-ü-中文",
      "😀".repeat(128), // 128 code points, 256 UTF-16 units
      "x".repeat(128),
    ]
  ) {
    assert(SESSION_ID_PATTERN.test(id), JSON.stringify(id));
  }
  for (
    const id of [
      "",
      "x".repeat(129),
      "a/b",
      "a+",
      "#",
      "a\u0000",
      "tab\there",
      "del\u007f",
      "c1\u0085",
      "\ufdd0",
      "\ufffe",
      "lone\ud800",
      // Look-alikes: white space, invisible and direction-changing characters.
      "my session",
      "bob\u200b",
      "\u200dbob",
      "b\u202eob",
      "bob\u2066",
      "bob\ufeff",
      "bob\u00a0",
      "bob\u3000",
      "bob\u3164",
      // The word for every session of a project.
      "all",
      "ALL",
    ]
  ) {
    assert(!SESSION_ID_PATTERN.test(id), JSON.stringify(id));
  }
});

Deno.test("topics: a topic matches a filter as MQTT matches it", () => {
  const yes: [string, string][] = [
    ["a/b", "a/b"],
    ["a/+", "a/b"],
    ["+/user_input/+", "maze/user_input/s1"],
    ["a/#", "a"],
    ["a/#", "a/b/c"],
    ["#", "a/b"],
    ["$share/g/maze/user_input", "maze/user_input"],
  ];
  const no: [string, string][] = [
    ["a/b", "a/b/c"],
    ["a/+", "a"],
    ["a/+", "a/b/c"],
    ["+/user_input", "maze/user_input/s1"],
    ["#", "$SYS/x"],
    ["+/status", "$SYS/status"],
  ];
  for (const [filter, topic] of yes) assert(topicMatches(filter, topic), `${filter} ${topic}`);
  for (const [filter, topic] of no) assert(!topicMatches(filter, topic), `${filter} ${topic}`);
});

Deno.test("topicMatches: wildcards and shared subscriptions as a broker matches them", () => {
  const cases: [string, string, boolean][] = [
    ["maze/user_input", "maze/user_input", true],
    ["+/user_input", "maze/user_input", true],
    ["+/user_input", "maze/user_input/s", false],
    ["+/user_input/+", "maze/user_input/s", true],
    ["maze/user_input", "racing/user_input", false],
    ["a/#", "a/b/c", true],
    ["a/#", "a", true],
    ["$share/pool/maze/user_input", "maze/user_input", true],
    ["maze/state/+", "maze/state", false],
  ];
  for (const [filter, topic, matches] of cases) {
    equal(topicMatches(filter, topic), matches, `${filter} ${topic}`);
  }
});
