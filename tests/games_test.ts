/**
 * Games: state in on `{project}/state`, one JSON hint out on
 * `{project}/hint/{session_id}`; project files with front matter; what the
 * simulated engine does for structured output, tools and LoRA adapters.
 */

import assert, { deepEqual, equal, match, ok, throws } from "node:assert/strict";
import { parseConfig } from "../lib/config/config.ts";
import { type Simulator, startSimulator } from "../lib/engine/simulator.ts";
import { vllmArgs } from "../lib/engine/vllm_supervisor.ts";
import { errorHint, guidanceFromToolCalls, hintObject } from "../lib/games/hints.ts";
import { boxedIn, parseState, stateMessage } from "../lib/games/maze_state.ts";
import { parseProjectFile, readProjectFile, turnShape } from "../lib/projects/project_file.ts";
import { SESSION_ID_PATTERN } from "../lib/protocol/topics.ts";
import {
  freePort,
  mosquittoTest as test,
  removeTempDir,
  ROOT,
  type SimServiceOptions,
  startService,
  tempDir,
  type TestClient,
  waitFor,
  withOriginalClient,
  withService,
} from "./_helpers.ts";

const MAZE = await readProjectFile("maze", `${ROOT}prompts/maze.md`);

/** A 5×5 maze: a border of walls (0) around open floor (1). */
const OPEN_MAP = [
  [0, 0, 0, 0, 0],
  [0, 1, 1, 1, 0],
  [0, 1, 1, 1, 0],
  [0, 1, 1, 1, 0],
  [0, 0, 0, 0, 0],
];
/** The player at (1, 1) with walls all round it. */
const BOXED_MAP = [
  [0, 0, 0, 0, 0],
  [0, 1, 0, 1, 0],
  [0, 0, 0, 1, 0],
  [0, 1, 1, 1, 0],
  [0, 0, 0, 0, 0],
];

async function promptsDir(files: Record<string, string>): Promise<string> {
  const dir = await tempDir("vllm-mqtt-prompts-");
  for (const [name, text] of Object.entries(files)) {
    await Deno.writeTextFile(`${dir}/${name}`, text);
  }
  return dir;
}

/**
 * Runs `fn` with a game client against a fresh service: an original client
 * reading its hints as the maze clients do (QoS 0, any topic under `+/hint/`,
 * unless `filter` says otherwise).
 */
function withGame(
  options: SimServiceOptions & { filter?: string },
  fn: (client: TestClient, sim: Simulator) => Promise<void>,
): Promise<void> {
  return withOriginalClient(
    { ...options, filter: options.filter ?? "+/hint/#" },
    (client, { sim }) => fn(client, sim),
  );
}

function hintsOf(client: TestClient, topic: string) {
  return client.received.filter((m) => m.topic === topic).map((m) => JSON.parse(m.text));
}

// --- Units: the project file ---------------------------------------------------------------

Deno.test("a project file without front matter is its prompt and nothing else", () => {
  const project = parseProjectFile("p", "prompts/p.md", "  # Guide\n\nBe brief.\n");
  equal(project.prompt, "# Guide\n\nBe brief.");
  equal(project.stateTopic, false);
  equal(project.responseFormat, undefined);
  deepEqual(turnShape(project, false), {});
  ok(Object.isFrozen(project));
  // A rule in the text is not a front matter: only `---` on the very first line opens one.
  equal(parseProjectFile("p", "p.md", "Text\n---\nmore").prompt, "Text\n---\nmore");
});

/** A project with tools and no schema (what vLLM can serve), for the tool-call mapping. */
const TOOLED = parseProjectFile(
  "tooled",
  "tooled.md",
  `---
tools:
  - function:
      name: break_wall
      parameters: { type: object, properties: { x: { type: integer }, y: { type: integer } } }
    maps_to: { break_wall: [x, y] }
  - function:
      name: speed_boost
      parameters:
        type: object
        properties: { duration_ms: { type: integer, default: 1500 } }
    maps_to: { speed_boost_ms: duration_ms }
  - function:
      name: teleport_player
      parameters: { type: object, properties: { x: { type: integer }, y: { type: integer } } }
    maps_to: { teleport_player: [x, y] }
  - function:
      name: spawn_oxygen
      parameters: { type: object, properties: { locations: { type: array } } }
    maps_to: { spawn_oxygen: locations }
  - function:
      name: highlight_zone
      parameters:
        type: object
        properties: { cells: { type: array }, duration_ms: { type: integer, default: 5000 } }
    maps_to: { highlight_zone: cells, highlight_ms: duration_ms }
  - function:
      name: reveal_map
      parameters: { type: object, properties: { enabled: { type: boolean } } }
    maps_to: { reveal_map: enabled }
---
# Tooled
`,
);

Deno.test("the maze file declares topics and the hint schema, its actions as optional properties", () => {
  assert(MAZE);
  equal(MAZE.stateTopic, true);
  equal(MAZE.hintTopic, true);
  equal(MAZE.applyTo, "state");
  ok(MAZE.prompt.startsWith("# Maze guide"));
  const schema = MAZE.responseFormat!.json_schema.schema as {
    properties: Record<string, unknown>;
    required: string[];
  };
  deepEqual(schema.required, ["hint"]);
  for (
    const key of [
      "hint",
      "suggestion",
      "path",
      "break_wall",
      "break_walls",
      "breaks_remaining",
      "show_path",
      "speed_boost_ms",
      "slow_germs_ms",
      "freeze_germs_ms",
      "teleport_player",
      "spawn_oxygen",
      "move_exit",
      "highlight_zone",
      "highlight_ms",
      "reveal_map",
    ]
  ) ok(key in schema.properties, key);
  // One structured answer carries the hint and the action: vLLM cannot hold an answer to a
  // schema and let it call tools too.
  equal(MAZE.tools, undefined);
  // Chat turns keep the plain contract; state turns get the schema.
  deepEqual(turnShape(MAZE, false), {});
  const state = turnShape(MAZE, true);
  ok(state.responseFormat && !state.tools && state.hint);
});

Deno.test("a front matter that cannot be used names the file, the key and the problem", () => {
  const bad = (front: string, pattern: RegExp) =>
    throws(() => parseProjectFile("maze", "prompts/maze.md", `---\n${front}\n---\nPrompt`), (
      error: Error,
    ) => {
      equal(error.name, "ConfigError");
      match(error.message, /^prompts\/maze\.md: /);
      match(error.message, pattern);
      return true;
    });
  bad("state_topic: yes please", /'state_topic': must be true or false, not "yes please"/);
  bad("hint_topics: true", /'hint_topics': unknown key/);
  bad("temperature: 3", /'temperature': must be a number from 0 to 2/);
  bad("max_tokens: 0", /'max_tokens': must be a whole number/);
  bad("apply_to: state", /'apply_to': is "state", but the project takes no state messages/);
  bad("model: two words", /'model': must be a model or adapter name/);
  bad("state_topic: [unclosed", /not valid YAML/);
  bad("state_topic: true\nstate_topic: false", /not valid YAML/);
  bad(
    "hint_topic: true\nresponse_format: { schema: { type: object, properties: { tip: { type: string } } } }",
    /'response_format.schema': must declare a string 'hint' property/,
  );
  bad(
    "tools: [{ function: { name: go, parameters: { type: object, properties: { x: {} } } }, maps_to: { go: [x, y] } }]",
    /'tools\[0\].maps_to.go': names 'y', which go has no parameter for/,
  );
  bad("tool_choice: auto", /'tool_choice': is set, but the project has no 'tools'/);
  // vLLM holds an answer to the schema or to a tool call, never both.
  for (const choice of ["", "\ntool_choice: auto", "\ntool_choice: required"]) {
    bad(
      "response_format: { schema: { type: object } }\ntools: [{ function: { name: go } }]" + choice,
      /'tools': cannot be served with 'response_format': vLLM holds an answer to one of them/,
    );
  }
  throws(
    () => parseProjectFile("maze", "prompts/maze.md", "---\nstate_topic: true\nPrompt"),
    /prompts\/maze\.md: the front matter opened by '---' on the first line has no closing/,
  );
});

// --- Units: state and hints ----------------------------------------------------------------

Deno.test("a state becomes the original's compact JSON, from either spelling", () => {
  const expected = JSON.stringify({
    player_pos: [1, 2],
    exit_pos: [3, 3],
    visible_map: OPEN_MAP,
    germs: [[2, 2]],
    oxygen: [[1, 3], [3, 1]],
    oxygen_collected: 2,
  });
  equal(
    stateMessage({
      sessionId: "s",
      player_pos: [1, 2],
      exit_pos: [3, 3],
      visible_map: OPEN_MAP,
      germs: [{ x: 2, y: 2 }],
      oxygenPellets: [{ x: 1, y: 3 }, [3, 1]],
      oxygenCollected: 2,
    }),
    expected,
  );
  equal(
    stateMessage({
      playerPosition: { x: 1, y: 2 },
      exitPosition: { x: 3, y: 3 },
      visibleMap: OPEN_MAP,
      germs: [[2, 2]],
      oxygen_pellets: [[1, 3], [3, 1]],
      oxygen_collected: 2,
    }),
    expected,
  );
  const encode = (value: unknown) => new TextEncoder().encode(JSON.stringify(value));
  const state = parseState(
    encode({
      session_id: 7,
      player_pos: [0, 0],
      prompt_template: { title: "t", content: "You are a pirate." },
      topP: 0.5,
    }),
    SESSION_ID_PATTERN,
  );
  equal(state.sessionId, "7");
  equal(state.systemPrompt, "You are a pirate.");
  deepEqual(state.params, { top_p: 0.5 });
  throws(() => parseState(encode({ sessionId: "s", player_pos: "here" }), SESSION_ID_PATTERN), {
    name: "StateError",
    sessionId: "s",
    message: `'player_pos' must be [x, y] or {"x": .., "y": ..} with numbers`,
  });
  throws(() => parseState(encode({ player_pos: [0, 0] }), SESSION_ID_PATTERN), {
    sessionId: undefined,
  });
  throws(() => parseState(new TextEncoder().encode("not json"), SESSION_ID_PATTERN), {
    message: "the state is not UTF-8 JSON",
  });
  deepEqual(boxedIn(stateMessage({ player_pos: [1, 1], visible_map: BOXED_MAP })), [2, 1]);
  equal(boxedIn(stateMessage({ player_pos: [1, 1], visible_map: OPEN_MAP })), undefined);
});

Deno.test("every answer becomes a hint object; tool calls become guidance keys", () => {
  deepEqual(hintObject("Go left."), { hint: "Go left." });
  deepEqual(hintObject('```json\n{"hint": "Go left.", "path": [[1, 2]]}\n```'), {
    hint: "Go left.",
    path: [[1, 2]],
  });
  deepEqual(hintObject('{"suggestion": "wait"}'), { suggestion: "wait", hint: "" });
  deepEqual(hintObject("[1, 2]"), { hint: "[1, 2]" });
  deepEqual(errorHint("timeout", "too slow"), {
    hint: "",
    error: { code: "timeout", message: "too slow" },
  });
  const guidance = guidanceFromToolCalls(TOOLED.tools!, [
    { name: "break_wall", arguments: '{"x": 2, "y": 1}' },
    { name: "speed_boost", arguments: "{}" },
    { name: "highlight_zone", arguments: '{"cells": [[1, 1]], "duration_ms": 900}' },
    { name: "spawn_oxygen", arguments: '{"locations": [[1, 3]]}' },
    { name: "spawn_oxygen", arguments: '{"locations": [[3, 1]]}' },
    { name: "reveal_map", arguments: '{"enabled": true}' },
    { name: "not_offered", arguments: "{}" },
    { name: "teleport_player", arguments: "{broken" },
  ], "Break through!");
  deepEqual(guidance, {
    hint: "Break through!",
    break_wall: [2, 1],
    speed_boost_ms: 1500,
    highlight_zone: [[1, 1]],
    highlight_ms: 900,
    spawn_oxygen: [[1, 3], [3, 1]],
    reveal_map: true,
  });
});

// --- Units: the simulated engine -----------------------------------------------------------

/** A simulated engine started as `options` say, and a way to ask it for a chat completion. */
async function withSim(
  options: Parameters<typeof startSimulator>[0],
  fn: (chat: (body: Record<string, unknown>) => Promise<Response>, sim: Simulator) => Promise<void>,
): Promise<void> {
  const sim = await startSimulator({ ttftMs: 0, itlMs: 0, ...options });
  const chat = (body: Record<string, unknown>) =>
    fetch(`${sim.url}/chat/completions`, {
      method: "POST",
      body: JSON.stringify({
        model: "sim-model",
        messages: [{ role: "user", content: "hi" }],
        ...body,
      }),
    });
  try {
    await fn(chat, sim);
  } finally {
    await sim.close();
  }
}

const TOOLS = TOOLED.tools!.map((t) => t.definition);
const BOXED_STATE = stateMessage({ player_pos: [1, 1], visible_map: BOXED_MAP });

Deno.test("the simulated engine answers schemas and serves named adapters as vLLM", async () => {
  await withSim({ adapters: ["maze-lora"] }, async (chat) => {
    const schema = {
      type: "object",
      properties: {
        count: { type: "integer", minimum: 3 },
        tip: { type: "string" },
        cells: { type: "array", items: { type: "array", items: { type: "integer" } }, minItems: 1 },
        mode: { enum: ["calm", "rush"] },
        extra: { type: "boolean" },
      },
      required: ["count", "cells", "mode"],
    };
    const structured = await (await chat({
      response_format: { type: "json_schema", json_schema: { name: "s", schema } },
    })).json();
    deepEqual(JSON.parse(structured.choices[0].message.content), {
      count: 3,
      tip: 'Turn 1: you said "hi".',
      cells: [[]],
      mode: "calm",
    });
    // The maze's schema carries the action: a boxed-in player gets a wall broken.
    const maze = await (await chat({
      messages: [{ role: "user", content: BOXED_STATE }],
      response_format: MAZE!.responseFormat,
    })).json();
    deepEqual(JSON.parse(maze.choices[0].message.content).break_wall, [2, 1]);

    const adapter = await (await chat({ model: "maze-lora" })).json();
    match(adapter.choices[0].message.content, /^maze-lora: /);
    const unknown = await chat({ model: "other-lora" });
    equal(unknown.status, 404);
    deepEqual((await unknown.json()).error.message, "The model `other-lora` does not exist.");
  });
});

Deno.test("vLLM: tools with tool_choice auto (its default) need --enable-auto-tool-choice and --tool-call-parser", async () => {
  await withSim({}, async (chat) => {
    for (const choice of [undefined, "auto"]) {
      const refused = await chat({ tools: TOOLS, tool_choice: choice });
      equal(refused.status, 400);
      deepEqual((await refused.json()).error, {
        message:
          '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
        type: "BadRequestError",
        param: null,
        code: 400,
      });
    }
    // Current vLLM refuses "required" without a parser too (v0.11.0 served it guided).
    const required = await chat({ tools: TOOLS, tool_choice: "required" });
    equal(required.status, 400);
    match((await required.json()).error.message, /--tool-call-parser/);
    // The request shape the maze project sent before: tools, auto and a schema.
    const old = await chat({
      messages: [{ role: "user", content: BOXED_STATE }],
      tools: TOOLS,
      tool_choice: "auto",
      response_format: MAZE!.responseFormat,
    });
    equal(old.status, 400);
    await old.body?.cancel();
    // "none" is served without a parser, and calls nothing.
    const none = await (await chat({ tools: TOOLS, tool_choice: "none" })).json();
    equal(none.choices[0].finish_reason, "stop");
  });
  await withSim({ toolParser: "hermes" }, async (chat) => {
    const called = await (await chat({
      messages: [{ role: "user", content: BOXED_STATE }],
      tools: TOOLS,
    })).json();
    const choice = called.choices[0];
    equal(choice.finish_reason, "tool_calls");
    equal(choice.message.tool_calls[0].type, "function");
    match(choice.message.tool_calls[0].id, /^chatcmpl-tool-/);
    deepEqual(choice.message.tool_calls[0].function.name, "break_wall");
    deepEqual(JSON.parse(choice.message.tool_calls[0].function.arguments), { x: 2, y: 1 });
    // Named in the message, with its defaults.
    const named = await (await chat({
      messages: [{ role: "user", content: "please speed_boost now" }],
      tools: TOOLS,
    })).json();
    deepEqual(JSON.parse(named.choices[0].message.tool_calls[0].function.arguments), {
      duration_ms: 1500,
    });
    // Streaming: the first piece names the call, the rest carry the arguments.
    const stream = await (await chat({
      messages: [{ role: "user", content: BOXED_STATE }],
      tools: TOOLS,
      stream: true,
    })).text();
    const chunks = stream.split("\n\n").filter((e) => e.startsWith("data: {")).map((e) =>
      JSON.parse(e.slice(6))
    );
    const pieces = chunks.flatMap((c) => c.choices[0]?.delta?.tool_calls ?? []);
    equal(pieces[0].function.name, "break_wall");
    equal(pieces[0].index, 0);
    deepEqual(
      JSON.parse(
        pieces.map((p: { function: { arguments: string } }) => p.function.arguments).join(""),
      ),
      { x: 2, y: 1 },
    );
    equal(chunks.find((c) => c.choices[0]?.finish_reason)!.choices[0].finish_reason, "tool_calls");
  });
});

Deno.test("vLLM: tools and response_format together: auto holds the answer to the schema, required drops the schema", async () => {
  await withSim({ toolParser: "hermes" }, async (chat) => {
    const both = { messages: [{ role: "user", content: BOXED_STATE }], tools: TOOLS };
    // auto: the schema holds the whole answer, so no tool is ever called.
    const auto = await (await chat({ ...both, response_format: MAZE!.responseFormat })).json();
    equal(auto.choices[0].finish_reason, "stop");
    equal(auto.choices[0].message.tool_calls, undefined);
    equal(typeof JSON.parse(auto.choices[0].message.content).hint, "string");
    // required: the call alone; the schema is dropped.
    const required = await (await chat({
      ...both,
      tool_choice: "required",
      response_format: MAZE!.responseFormat,
    })).json();
    equal(required.choices[0].finish_reason, "tool_calls");
    equal(required.choices[0].message.content, null);
    equal(required.choices[0].message.tool_calls[0].function.name, "break_wall");
  });
});

Deno.test("the supervisor serves --lora-modules with --enable-lora", () => {
  const result = parseConfig(["--lora-modules", "maze-lora=/models/maze,race=/models/race"], {});
  assert(!result.help);
  const args = vllmArgs(result.config, 8000);
  const at = args.indexOf("--enable-lora");
  ok(at > 0);
  deepEqual(args.slice(at, at + 8), [
    "--enable-lora",
    "--max-lora-rank",
    "16",
    "--max-loras",
    "1",
    "--lora-modules",
    "maze-lora=/models/maze",
    "race=/models/race",
  ]);
  throws(() => parseConfig(["--lora-modules", "nopath"], {}), /NAME=PATH/);
});

// --- End to end ----------------------------------------------------------------------------

test("a game's state gets one parsable hint on maze/hint/{sid}, kept in its history", async () => {
  await withGame({}, async (client, sim) => {
    await client.send("maze/state", {
      sessionId: "g1",
      player_pos: [1, 1],
      exit_pos: [3, 3],
      visible_map: OPEN_MAP,
      germs: [{ x: 2, y: 2 }],
      oxygenPellets: [{ x: 1, y: 3 }],
    }, { qos: 0 });
    const first = await client.next((m) => m.topic === "maze/hint/g1");
    const hint = JSON.parse(first.text);
    equal(typeof hint.hint, "string");
    match(
      hint.hint,
      /^\[Maze guide\] Turn 1: you said "\{"player_pos":\[1,1\],"exit_pos":\[3,3\]/,
    );
    const body = sim.received.at(-1)!;
    equal((body.response_format as { type: string }).type, "json_schema");
    equal(body.tools, undefined);
    const user = (body.messages as { role: string; content: string }[]).at(-1)!;
    deepEqual(JSON.parse(user.content), {
      player_pos: [1, 1],
      exit_pos: [3, 3],
      visible_map: OPEN_MAP,
      germs: [[2, 2]],
      oxygen: [[1, 3]],
      oxygen_collected: 0,
    });

    // The web maze's spelling and its template: the second turn of the same session.
    await client.send("maze/state", {
      sessionId: "g1",
      playerPosition: { x: 2, y: 1 },
      prompt_template: { title: "mine", content: "Lab helper\nBe terse." },
    }, { qos: 0 });
    const second = await client.next((m) =>
      m.topic === "maze/hint/g1" && client.received.indexOf(m) > client.received.indexOf(first)
    );
    match(JSON.parse(second.text).hint, /^\[Lab helper\] Turn 2: /);
    equal(hintsOf(client, "maze/hint/g1").length, 2);
    // Nothing went to the chat reply topic.
    ok(!client.received.some((m) => m.topic.startsWith("maze/assistant_response")));
  });
});

test("the maze project on a vLLM-faithful engine gets a parseable hint and its action on every state", async () => {
  await withGame({}, async (client, sim) => {
    const states = [
      { player_pos: [1, 1], visible_map: BOXED_MAP, action: [2, 1] },
      { player_pos: [2, 2], visible_map: OPEN_MAP, action: undefined },
      { player_pos: [3, 1], visible_map: BOXED_MAP, action: undefined },
      { player_pos: [0, 0], visible_map: [[1, 0], [0, 0]], action: [1, 0] },
    ];
    for (const [i, { action, ...state }] of states.entries()) {
      const sessionId = `g2-${i}`;
      await client.send("maze/state", { sessionId, ...state });
      const text = (await client.next((m) => m.topic === `maze/hint/${sessionId}`)).text;
      const hint = JSON.parse(text);
      equal(hint.error, undefined, text);
      match(hint.hint, /^\[Maze guide\] Turn 1: /);
      deepEqual(hint.break_wall, action);
    }
    // One constraint per request, as vLLM can serve it: the schema, no tools.
    for (const body of sim.received) {
      equal(body.tools, undefined);
      equal((body.response_format as { type: string }).type, "json_schema");
    }
  });
});

test("a project with tools is served by an engine started with tool parsing (--engine sim)", async () => {
  const dir = await promptsDir({
    "tooled.md":
      `---\ntools:\n  - function: { name: wave, parameters: { type: object } }\n---\n# Tooled\n`,
  });
  try {
    await withService(
      { args: ["--engine=sim", `--prompts-dir=${dir}`, "--projects=tooled"] },
      async ({ client }) => {
        await client.subscribe("tooled/assistant_response/#");
        await client.send("tooled/user_input", { session_id: "t1", message: "please wave" });
        const done = await client.final("t1");
        equal(done.json!.type, "done", JSON.stringify(done.json));
        deepEqual(JSON.parse(String(done.json!.response)).wave, {});
      },
    );
  } finally {
    await removeTempDir(dir);
  }
});

test("ten states sent quickly to a slow engine make at most two turns and the last one's hint", async () => {
  const port = freePort();
  await withGame(
    { sim: { ttftMs: 3000 }, args: [`--http-port=${port}`] },
    async (client, sim) => {
      const turns = () =>
        sim.received.filter((b) =>
          JSON.stringify((b.messages as { content: string }[]).at(-1)!.content).includes(
            "player_pos",
          )
        ).length;
      const state = (i: number) => ({ sessionId: "g3", player_pos: [i, 0] });
      await client.send("maze/state", state(0), { qos: 0 });
      // The first is in the engine (for 3 s): the other nine arrive behind it.
      await waitFor(() => sim.running === 1, 10_000, "the first state's turn to reach the engine");
      for (let i = 1; i < 10; i++) await client.send("maze/state", state(i), { qos: 0 });
      // The latest state wins: the hint of the tenth arrives (next() fails after 30 s if not),
      // and it is a hint object a game can parse.
      const last = await client.next(
        (m) => m.topic === "maze/hint/g3" && m.text.includes('\\"player_pos\\":[9,0]'),
        30_000,
      );
      equal(typeof JSON.parse(last.text).hint, "string");
      const hints = hintsOf(client, "maze/hint/g3");
      ok(hints.length <= 2, `${hints.length} hints`);
      const ran = turns();
      ok(ran <= 2, `${ran} turns`);
      const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
      const superseded = Number(
        /vllm_mqtt_ignored_total\{reason="superseded"\} (\d+)/.exec(metrics)?.[1] ?? 0,
      );
      equal(superseded + ran, 10);
    },
  );
});

test("a template and a clear are acknowledged on the hint topic", async () => {
  await withGame({ filter: "#" }, async (client) => {
    await client.send("maze/template/g4", { template: "You are a pirate." });
    const template = await client.next((m) => m.topic === "maze/hint/g4");
    deepEqual(JSON.parse(template.text), { hint: "Template updated" });
    await client.send("maze/clear_history", { sessionId: "g4" });
    await client.next((m) => m.topic === "maze/hint/g4" && m.text.includes("History"));
    deepEqual(hintsOf(client, "maze/hint/g4"), [
      { hint: "Template updated" },
      { hint: "History cleared" },
    ]);
    // The usual acknowledgement still goes to the reply topic; a project without a hint
    // topic gets only that one.
    await client.next((m) => m.topic === "maze/assistant_response/g4");
    await client.send("general/clear_history/g5", {});
    await client.next((m) => m.topic === "general/assistant_response/g5");
    ok(!client.received.some((m) => m.topic.startsWith("general/hint")));
  });
});

test("a malformed state gets a JSON error hint", async () => {
  await withGame({ filter: "#" }, async (client) => {
    await client.send("maze/state", { sessionId: "g6", player_pos: "somewhere" });
    const hint = JSON.parse((await client.next((m) => m.topic === "maze/hint/g6")).text);
    equal(hint.hint, "");
    equal(hint.error.code, "invalid_request");
    match(hint.error.message, /'player_pos' must be \[x, y\]/);
    // On the session's own state topic too, where the payload may leave the id out.
    await client.send("maze/state/g7", { visible_map: "nope", player_pos: [0, 0] });
    const own = JSON.parse((await client.next((m) => m.topic === "maze/hint/g7")).text);
    match(own.error.message, /'visible_map' must be a list of rows/);
    // A state nested deeper than any map is refused before it is parsed; so is a command.
    const deep = "[".repeat(100_000) + "]".repeat(100_000);
    await client.send("maze/state/g9", `{"player_pos":[0,0],"visible_map":${deep}}`);
    const nested = JSON.parse((await client.next((m) => m.topic === "maze/hint/g9")).text);
    deepEqual(nested.error, {
      code: "invalid_request",
      message: "payload nests arrays and objects more than 32 levels deep",
    });
    // Not read, it is answered in the original's plain text, and nothing is cleared.
    await client.send("maze/clear_history/g9", `{"session_id":"g9","x":${deep}}`);
    const refused = await client.next((m) => m.topic === "maze/assistant_response/g9");
    equal(refused.text, "Error: payload nests arrays and objects more than 32 levels deep");
  });
});

test("states that name no session are counted, and logged once a minute", async () => {
  await withService({}, async ({ client, service }) => {
    for (let i = 0; i < 5; i++) await client.send("maze/state", "not json");
    await client.send("maze/user_input", { session_id: "s1", message: "hi", format: "json" });
    await client.final("s1");
    equal(service.log().match(/Unanswerable state on maze/g)?.length, 1, service.log());
  });
});

test("a model answer that is not JSON is wrapped, its thinking removed", async () => {
  const dir = await promptsDir({
    "game.md": "---\nstate_topic: true\nhint_topic: true\n---\n# Game guide\n\nHelp the player.\n",
  });
  try {
    await withGame({
      args: [`--prompts-dir=${dir}`, "--projects=game"],
      // QwQ, served without a reasoning parser: its answers open inside the thinking block
      // (no <think>) and close it with </think>.
      sim: { thinking: "always", model: "Qwen/QwQ-32B" },
    }, async (client, sim) => {
      await client.send("game/state", { sessionId: "g8", player_pos: [4, 2] });
      const text = (await client.next((m) => m.topic === "game/hint/g8")).text;
      const hint = JSON.parse(text);
      deepEqual(Object.keys(hint), ["hint"]);
      match(hint.hint, /^\[Game guide\] Turn 1: you said "\{"player_pos":\[4,2\]/);
      ok(!text.includes("think"));
      // No schema and no tools were asked for.
      equal(sim.received.at(-1)!.response_format, undefined);
      equal(sim.received.at(-1)!.tools, undefined);
    });
  } finally {
    await removeTempDir(dir);
  }
});

test("a project's model reaches the engine", async () => {
  const dir = await promptsDir({
    "tuned.md": "---\nmodel: maze-lora\ntemperature: 0.2\nmax_tokens: 77\n---\n# Tuned\n",
  });
  try {
    await withService({
      args: [`--prompts-dir=${dir}`, "--projects=tuned"],
      sim: { adapters: ["maze-lora"] },
    }, async ({ sim, client }) => {
      await client.subscribe(["tuned/assistant_response/#"]);
      await client.send("tuned/user_input", { session_id: "t1", message: "hi" });
      const done = await client.final("t1");
      equal(done.json!.response, 'maze-lora: [Tuned] Turn 1: you said "hi".');
      const body = sim.received.at(-1)!;
      equal(body.model, "maze-lora");
      // The file's sampling defaults, where the request sets none.
      deepEqual([body.temperature, body.max_tokens], [0.2, 77]);
      await client.send("tuned/user_input", {
        session_id: "t2",
        message: "hi",
        params: { temperature: 1 },
      });
      await client.final("t2");
      equal(sim.received.at(-1)!.temperature, 1);
    });
  } finally {
    await removeTempDir(dir);
  }
});

test("a broken front matter stops the start-up with the file, the key and the problem", async () => {
  const dir = await promptsDir({ "maze.md": "---\nstate_topic: yes please\n---\n# Maze\n" });
  const data = await tempDir("vllm-mqtt-data-");
  const start = () =>
    startService([
      "--engine=sim",
      `--prompts-dir=${dir}`,
      `--data-dir=${data}`,
      "--projects=maze",
      `--mqtt-url=mqtt://127.0.0.1:${freePort()}`,
    ], { expectExit: true });
  try {
    const service = await start();
    const code = await service.stop();
    ok(code !== 0);
    match(service.log(), /maze\.md: front matter key 'state_topic': must be true or false/);
    // An unserved model is named the same way, before anything starts.
    await Deno.writeTextFile(`${dir}/maze.md`, "---\nmodel: maze-lora\n---\n# Maze\n");
    const again = await start();
    ok(await again.stop() !== 0);
    match(again.log(), /maze\.md: front matter key 'model': maze-lora is not served/);
    // A schema and tools together: vLLM could serve only one of them.
    await Deno.writeTextFile(
      `${dir}/maze.md`,
      "---\nresponse_format: { schema: { type: object } }\ntools: [{ function: { name: go } }]\n---\n# Maze\n",
    );
    const both = await start();
    ok(await both.stop() !== 0);
    match(
      both.log(),
      /maze\.md: front matter key 'tools': cannot be served with 'response_format'/,
    );
  } finally {
    await removeTempDir(dir);
    await removeTempDir(data);
  }
});

test("chat on maze/user_input still streams as before", async () => {
  await withService({}, async ({ client, sim }) => {
    await client.send("maze/user_input", { session_id: "c1", message: "hi" });
    const done = await client.final("c1");
    equal(done.json!.response, '[Maze guide] Turn 1: you said "hi".');
    const deltas = client.received.filter((m) =>
      m.json?.session_id === "c1" && m.json.type === "delta"
    );
    ok(deltas.length > 0);
    equal(deltas.map((m) => m.json!.delta).join(""), done.json!.response);
    const body = sim.received.at(-1)!;
    equal(body.response_format, undefined);
    equal(body.tools, undefined);
  });
});
