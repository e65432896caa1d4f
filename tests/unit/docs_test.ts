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
