/**
 * What the executable and the deployment files must hold: the compile task
 * names every module started as a worker; the systemd unit, the image and
 * the docs run the real deno binary and find vLLM.
 */

import assert, { deepEqual, match } from "node:assert/strict";

Deno.test("compile: every module started as a worker is named in the compile task", async () => {
  const task: string =
    JSON.parse(await Deno.readTextFile(new URL("../../deno.json", import.meta.url))).tasks
      .compile;
  const included = [...task.matchAll(/--include (\S+)/g)].map((m) => m[1]);
  const workers: string[] = [];
  for await (const entry of Deno.readDir(new URL("../../lib", import.meta.url))) {
    if (!entry.isDirectory) continue;
    for await (const file of Deno.readDir(new URL(`../../lib/${entry.name}`, import.meta.url))) {
      if (!file.isFile) continue;
      const source = await Deno.readTextFile(
        new URL(`../../lib/${entry.name}/${file.name}`, import.meta.url),
      );
      for (const m of source.matchAll(/new URL\("\.\/(\w+\.ts)", import\.meta\.url\)/g)) {
        workers.push(`lib/${entry.name}/${m[1]}`);
      }
    }
  }
  deepEqual(workers.sort(), ["lib/engine/simulator_worker.ts", "lib/workers/request_worker.ts"]);
  for (const worker of workers) assert(included.includes(worker), `${worker} is not included`);
  assert(included.includes("prompts"), "prompts/ is not included");
  // The live page's files are imported as text (in the module graph, so in the executable
  // without an include, and read with no permission): every file of its folder.
  const dashboard = await Deno.readTextFile(
    new URL("../../lib/observability/dashboard.ts", import.meta.url),
  );
  const imported = [...dashboard.matchAll(/from "\.\/page\/([\w.]+)" with \{ type: "text" \}/g)]
    .map((m) => m[1]);
  const files: string[] = [];
  for await (const file of Deno.readDir(new URL("../../lib/observability/page", import.meta.url))) {
    files.push(file.name);
  }
  deepEqual(imported.sort(), files.sort());
});

Deno.test("deploy: every production path runs the real deno binary, never the npm shim", async () => {
  const read = (path: string) => Deno.readTextFile(new URL(`../../${path}`, import.meta.url));
  // The npm `deno` may be a Node script that does not pass SIGTERM on: a stop would leave the
  // service running. The production paths run `deno-bin`, the real binary linked at install.
  const unit = await read("deploy/vllm-mqtt.service");
  match(unit, /^ExecStart=\/usr\/local\/bin\/deno-bin run /m);
  const engines = await read("docs/engines.md");
  assert(
    engines.includes(
      `ln -sf "$(deno eval 'console.log(Deno.execPath())')" /usr/local/bin/deno-bin`,
    ),
    "docs/engines.md's bare-metal steps do not link /usr/local/bin/deno-bin",
  );
  const dockerfile = await read("vllm.Dockerfile");
  match(
    dockerfile,
    /ln -sf "\$\(deno eval 'console.log\(Deno.execPath\(\)\)'\)" \/usr\/local\/bin\/deno-bin/,
  );
  match(dockerfile, /^ENTRYPOINT \["deno-bin", "run"/m);
});

Deno.test("deploy: the unit finds a vLLM in its virtualenv; the docs say what the image's health check asks", async () => {
  const read = (path: string) => Deno.readTextFile(new URL(`../../${path}`, import.meta.url));
  // systemd's default PATH holds no virtualenv: `vllm` (run by name) would not be found.
  const unit = await read("deploy/vllm-mqtt.service");
  const path = /^Environment=PATH=(\S+)$/m.exec(unit)?.[1];
  assert(path, "the unit sets no PATH");
  const engines = await read("docs/engines.md");
  const venv = path.split(":")[0];
  assert(engines.includes(venv), `docs/engines.md does not name the unit's ${venv}`);
  // The image's HEALTHCHECK asks /readyz; the docs say the same.
  match(await read("vllm.Dockerfile"), /^HEALTHCHECK[^]*\/readyz/m);
  match(engines, /HEALTHCHECK\s+asks the program's `\/readyz`/);
});
