/**
 * Managed vLLM's command line for what the projects need: tool parsing, the
 * reasoning parser of the model's family, LoRA limits (lib/engine/vllm_supervisor.ts,
 * lib/engine/model_family.ts).
 */

import assert, { deepEqual, equal, ok, throws } from "node:assert/strict";
import { parseConfig } from "../../lib/config/config.ts";
import { checkLoraRanks, vllmArgs, vllmEnv } from "../../lib/engine/vllm_supervisor.ts";

function config(argv: string[]) {
  const parsed = parseConfig(argv, {});
  assert(!parsed.help);
  return parsed.config;
}

const valueOf = (args: string[], name: string) =>
  args.includes(name) ? args[args.indexOf(name) + 1] : undefined;

Deno.test("vLLM: a project with tools starts vLLM with --enable-auto-tool-choice and the family's --tool-call-parser", () => {
  const qwq = vllmArgs(config([]), 8000, { tools: true });
  ok(qwq.includes("--enable-auto-tool-choice"));
  equal(valueOf(qwq, "--tool-call-parser"), "hermes");
  const llama = vllmArgs(config(["--model=meta-llama/Llama-3.1-8B-Instruct"]), 8000, {
    tools: true,
  });
  equal(valueOf(llama, "--tool-call-parser"), "llama3_json");
  const chosen = vllmArgs(config(["--tool-call-parser=pythonic"]), 8000, { tools: true });
  equal(valueOf(chosen, "--tool-call-parser"), "pythonic");
  // No project with tools: no tool parsing asked of vLLM.
  ok(!vllmArgs(config([]), 8000).includes("--enable-auto-tool-choice"));
  // A family without a known parser: refused at start, naming the option.
  throws(
    () => vllmArgs(config(["--model=acme/Unknown-7B"]), 8000, { tools: true }),
    /no tool-call parser is known for acme\/Unknown-7B: give --tool-call-parser/,
  );
  throws(
    () => vllmArgs(config(["--tool-call-parser=none"]), 8000, { tools: true }),
    /--tool-call-parser is none/,
  );
});

Deno.test("vLLM: the default model QwQ gets --reasoning-parser deepseek_r1; Qwen3 qwen3; others none", () => {
  equal(valueOf(vllmArgs(config([]), 8000), "--reasoning-parser"), "deepseek_r1");
  equal(
    valueOf(vllmArgs(config(["--model=Qwen/Qwen3-14B"]), 8000), "--reasoning-parser"),
    "qwen3",
  );
  equal(
    valueOf(vllmArgs(config(["--model=Qwen/Qwen2.5-7B-Instruct"]), 8000), "--reasoning-parser"),
    undefined,
  );
  equal(
    valueOf(vllmArgs(config(["--reasoning-parser=none"]), 8000), "--reasoning-parser"),
    undefined,
  );
});

Deno.test("vLLM: LoRA adapters get --max-lora-rank and --max-loras; a path with '=' is refused", () => {
  const args = vllmArgs(
    config(["--lora-modules=maze=/m/maze", "--max-lora-rank=64", "--max-loras=4"]),
    8000,
  );
  deepEqual([valueOf(args, "--max-lora-rank"), valueOf(args, "--max-loras")], ["64", "4"]);
  // vLLM splits NAME=PATH at the first '=': a path holding another would reach it cut.
  throws(() => config(["--lora-modules=maze=/m/a=b"]), /NAME=PATH/);
  // vLLM takes a few ranks only.
  throws(() => config(["--max-lora-rank=24"]), /'--max-lora-rank' must be one of 1, 8, 16, 32/);
});

Deno.test("vLLM: an adapter of a rank above --max-lora-rank is refused before vLLM starts", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(`${dir}/adapter_config.json`, JSON.stringify({ r: 64 }));
    await assert.rejects(
      checkLoraRanks(config([`--lora-modules=maze=${dir}`])),
      /LoRA adapter maze .* has rank 64, above --max-lora-rank 16: .* give --max-lora-rank 64/,
    );
    await checkLoraRanks(config([`--lora-modules=maze=${dir}`, "--max-lora-rank=64"]));
    // A hub id (no local folder) is left to vLLM.
    await checkLoraRanks(config(["--lora-modules=maze=org/maze-lora"]));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("vLLM: --top-p 0 is refused at start (vLLM takes 0 < top_p <= 1)", () => {
  throws(() => config(["--top-p=0"]), /'--top-p' must be above 0/);
  equal(config(["--top-p=1"]).topP, 1);
});

Deno.test("vLLM: the child's environment holds the API key and none of the service's settings", () => {
  const env = vllmEnv(config([]), {
    PATH: "/usr/bin",
    HF_TOKEN: "hf",
    VLLM_MQTT_MQTT_PASSWORD: "broker-secret",
    VLLM_MQTT_SESSION_SECRET: "signing-secret",
  }, "the-key");
  deepEqual(env.VLLM_API_KEY, "the-key");
  deepEqual([env.PATH, env.HF_TOKEN], ["/usr/bin", "hf"]);
  ok(!JSON.stringify(env).includes("secret"));
});
