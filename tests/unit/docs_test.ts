/** The docs' pointers: what a file of the repository names in the docs exists. */

import assert from "node:assert/strict";

Deno.test("prompts: a prompt file's pointer to the docs names a section that exists", async () => {
  let pointers = 0;
  for await (const entry of Deno.readDir(new URL("../../prompts", import.meta.url))) {
    const text = await Deno.readTextFile(new URL(`../../prompts/${entry.name}`, import.meta.url));
    // `(see docs/protocol.md, "Project files")`, and the README as a place that moves.
    for (const [, file, section] of text.matchAll(/see ([\w./-]+\.md|README), "([^"]+)"/g)) {
      pointers++;
      const doc = await Deno.readTextFile(new URL(`../../${file}`, import.meta.url)).catch(() =>
        ""
      );
      assert(
        new RegExp(`^#+ ${section}$`, "m").test(doc),
        `prompts/${entry.name} points at "${section}" in ${file}, which has no such section`,
      );
    }
  }
  assert(pointers > 0, "no pointer found: the pattern no longer matches the prompt files");
});

const ROOT = new URL("../../", import.meta.url);

/** The lines of `markdown`'s section under `heading` (to the next heading of any level). */
async function section(path: string, heading: string): Promise<string[]> {
  const lines = (await Deno.readTextFile(new URL(path, ROOT))).split("\n");
  const start = lines.indexOf(heading);
  assert(start >= 0, `${path} has no "${heading}"`);
  const end = lines.findIndex((line, i) => i > start && /^#+ /.test(line));
  return lines.slice(start + 1, end < 0 ? undefined : end);
}

/** Every `.ts` file under lib/, as a path relative to lib/. */
async function libFiles(dir = ""): Promise<string[]> {
  const files: string[] = [];
  for await (const entry of Deno.readDir(new URL(`lib/${dir}`, ROOT))) {
    if (entry.isDirectory) files.push(...await libFiles(`${dir}${entry.name}/`));
    else if (entry.name.endsWith(".ts")) files.push(`${dir}${entry.name}`);
  }
  return files;
}

/** Whether `path` (relative to lib/; a folder when it ends in `/`) exists. */
async function inLib(path: string): Promise<boolean> {
  const info = await Deno.stat(new URL(`lib/${path}`, ROOT)).catch(() => undefined);
  return path.endsWith("/") ? info?.isDirectory === true : info?.isFile === true;
}

/** File and folder names in backticks: `name.ts`, `folder/name.ts`, `folder/`. */
const NAMED = /`([\w./-]+(?:\.ts|\/))`/g;

/**
 * What the README's map of lib/ names: each bullet is a file of lib/
 * (`- \`tokens.ts\`: ...`) or a folder (`- \`gateway/\`: ...`) whose names
 * are its own files (a name with a folder in it is relative to lib/).
 */
async function readmeMap(): Promise<string[]> {
  const bullets = (await section("README.md", "## Map of `lib/`")).join("\n").split(/^- /m).slice(
    1,
  );
  assert(bullets.length > 0, "the README's map of lib/ holds no bullet");
  const named: string[] = [];
  for (const bullet of bullets) {
    const head = /^`([\w.-]+(?:\.ts|\/))`:/.exec(bullet)?.[1];
    assert(head, `a bullet of the README's map does not start with a file or folder: ${bullet}`);
    named.push(head);
    const folder = head.endsWith("/") ? head : "";
    for (const [, name] of bullet.slice(head.length + 3).matchAll(NAMED)) {
      named.push(name.includes("/") && !name.endsWith("/") ? name : `${folder}${name}`);
    }
  }
  return named;
}

Deno.test("README's map of lib/: names every file of lib/, and only files that exist", async () => {
  const named = await readmeMap();
  const missing = (await libFiles()).filter((file) => !named.includes(file));
  assert(missing.length === 0, `the README's map of lib/ does not name ${missing.join(", ")}`);
  const gone: string[] = [];
  for (const name of named) if (!await inLib(name)) gone.push(name);
  assert(gone.length === 0, `the README's map of lib/ names what lib/ does not hold: ${gone}`);
});

Deno.test("docs/how-it-works.md: the files its table of steps names exist in lib/", async () => {
  const table = (await section("docs/how-it-works.md", "## Where each step is"))
    .filter((line) => line.startsWith("|"));
  assert(table.length > 2, "docs/how-it-works.md's table of steps is gone");
  const named = table.flatMap((line) => [...line.matchAll(NAMED)].map((m) => m[1]));
  assert(named.length > 0, "the table names no file: the pattern no longer matches it");
  const gone: string[] = [];
  for (const name of named) if (!await inLib(name)) gone.push(name);
  assert(gone.length === 0, `docs/how-it-works.md's table names what lib/ does not hold: ${gone}`);
});
