/**
 * No two files of the service export the same name: a reader who meets a
 * name, or searches for it, finds one thing. Two types of one name (an
 * import renamed `as` something else to tell them apart) were two things
 * spoken of in one word.
 *
 * @module
 */

import { deepEqual } from "node:assert/strict";
import { sourceFiles } from "./_source_files.ts";

const ROOT = new URL("../../", import.meta.url);
/** A declaration exported by name (re-exports such as `export * from` declare nothing). */
const EXPORT =
  /^export\s+(?:declare\s+)?(?:default\s+)?(?:async\s+)?(?:abstract\s+)?(?:class|function\*?|const|let|var|interface|type|enum)\s+([A-Za-z_$][\w$]*)/gm;

/** Each exported name, with the files of lib/ that declare it, by path relative to the repository. */
async function exportedNames(): Promise<Map<string, string[]>> {
  const names = new Map<string, string[]>();
  for (const file of await sourceFiles(new URL("lib/", ROOT))) {
    const path = file.href.slice(ROOT.href.length);
    for (const [, name] of (await Deno.readTextFile(file)).matchAll(EXPORT)) {
      names.set(name, [...names.get(name) ?? [], path]);
    }
  }
  return names;
}

Deno.test("no two files of lib/ export the same name", async () => {
  const names = await exportedNames();
  const shared = [...names].filter(([, files]) => files.length > 1)
    .map(([name, files]) => `${name}: ${files.sort().join(", ")}`).sort();
  deepEqual(shared, []);
});

Deno.test("the scan finds the exports it is meant to find", async () => {
  const names = await exportedNames();
  // One of each kind of declaration, so that a scan that finds nothing cannot pass.
  for (
    const [name, file] of [
      ["ServiceError", "lib/protocol/errors.ts"], // class
      ["asServiceError", "lib/protocol/errors.ts"], // function
      ["ErrorCode", "lib/protocol/errors.ts"], // type
      ["WireError", "lib/protocol/errors.ts"], // interface
      ["STORAGE_RETRY_AFTER_MS", "lib/sessions/storage_health.ts"], // const
    ]
  ) deepEqual(names.get(name), [file], name);
});
