/**
 * docs/options.md, rendered from the option table by tools/options_doc.ts:
 * the page in the repository is what the generator renders now.
 */

import assert, { equal, match } from "node:assert/strict";
import { parseConfig } from "../../lib/config/config.ts";
import { OPTIONS } from "../../lib/config/options.ts";
import { MACHINE_DEFAULTS, OPTIONS_DOC_PATH, optionsDoc } from "../../tools/options_doc.ts";

const config = (argv: string[]) => {
  const result = parseConfig(argv, {}, () => "");
  if (result.help) throw new Error("unexpected help");
  return result.config;
};

Deno.test("docs/options.md: is what `deno task docs` renders from the option table now", async () => {
  const page = await Deno.readTextFile(new URL(`../../${OPTIONS_DOC_PATH}`, import.meta.url));
  const rendered = optionsDoc();
  // Every option has its row, with its default (or, for a default computed on the machine, the
  // words for it), in what the generator renders...
  for (const option of OPTIONS) {
    const row = rendered.split("\n").find((line) => line.startsWith(`| \`--${option.name}\``));
    assert(row, `the generator leaves out --${option.name}`);
    if (MACHINE_DEFAULTS[option.name]) {
      assert(row.includes(MACHINE_DEFAULTS[option.name].text), `--${option.name}'s default`);
    } else if (option.default !== undefined) {
      const value = Array.isArray(option.default) ? option.default.join(",") : option.default;
      if (value !== "") assert(row.includes(`\`${value}\``), `--${option.name}'s default`);
    }
  }
  // ...and the page in the repository is exactly that: an option added or changed in
  // lib/config/options.ts without `deno task docs` fails here.
  equal(page, rendered, `${OPTIONS_DOC_PATH} is out of date: run \`deno task docs\``);
});

Deno.test("docs/options.md: --workers defaults to the number of CPU cores (at most 64), whatever that number is", async () => {
  // What the page claims...
  const row = optionsDoc().split("\n").find((line) => line.startsWith("| `--workers`"));
  match(String(row), /^\| `--workers` +\| the number of CPU cores, at most 64 +\|/);
  // ...checked on machines of other sizes than this one: the option table is read again as a
  // machine with that many cores reads it (a fresh copy of its module, the count stubbed).
  for (const [cores, workers] of [[1, 1], [3, 3], [64, 64], [128, 64]]) {
    Object.defineProperty(navigator, "hardwareConcurrency", { value: cores, configurable: true });
    try {
      const url = new URL(`../../lib/config/options.ts?cores=${cores}`, import.meta.url).href;
      const table = (await import(url)) as typeof import("../../lib/config/options.ts");
      equal(table.OPTIONS.find((option) => option.name === "workers")?.default, workers);
      equal(MACHINE_DEFAULTS.workers.value(), workers, "the generator's check of it");
    } finally {
      delete (navigator as { hardwareConcurrency?: number }).hardwareConcurrency;
    }
  }
  equal(navigator.hardwareConcurrency, config([]).workers, "the stub is gone");
});
