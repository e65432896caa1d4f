/**
 * No two files of the service import each other, directly or around a loop,
 * not even for types only: a cycle means neither module can be read, tested or
 * moved without the other, and it is where layers start to blur.
 *
 * @module
 */

import assert, { deepEqual } from "node:assert/strict";
import { sourceFiles } from "./_source_files.ts";

const ROOT = new URL("../../", import.meta.url);
/** Relative imports and re-exports, static or dynamic, `import type` included. */
const IMPORT = /(?:\bfrom\s*|\bimport\s*\(?\s*)"(\.{1,2}\/[^"]+\.ts)"/g;

/** Each file's local imports, by path relative to the repository. */
async function importGraph(): Promise<Map<string, string[]>> {
  const files = [new URL("main.ts", ROOT), ...await sourceFiles(new URL("lib/", ROOT))];
  const graph = new Map<string, string[]>();
  for (const file of files) {
    const text = await Deno.readTextFile(file);
    const targets = [...text.matchAll(IMPORT)].map((m) => new URL(m[1], file).href);
    graph.set(file.href, targets);
  }
  return graph;
}

/** The strongly connected components with more than one file (Tarjan's algorithm). */
function cycles(graph: ReadonlyMap<string, readonly string[]>): string[][] {
  let next = 0;
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const onStack = new Set<string>();
  const found: string[][] = [];
  const visit = (node: string) => {
    index.set(node, next);
    low.set(node, next++);
    stack.push(node);
    onStack.add(node);
    for (const target of graph.get(node) ?? []) {
      if (!index.has(target)) {
        visit(target);
        low.set(node, Math.min(low.get(node)!, low.get(target)!));
      } else if (onStack.has(target)) {
        low.set(node, Math.min(low.get(node)!, index.get(target)!));
      }
    }
    if (low.get(node) === index.get(node)) {
      const component: string[] = [];
      let member: string;
      do {
        member = stack.pop()!;
        onStack.delete(member);
        component.push(member);
      } while (member !== node);
      const selfLoop = graph.get(node)?.includes(node) ?? false;
      if (component.length > 1 || selfLoop) found.push(component.sort());
    }
  };
  for (const node of graph.keys()) if (!index.has(node)) visit(node);
  return found;
}

Deno.test("the cycle finder sees a loop of three files and a file importing itself", () => {
  const graph = new Map([
    ["a", ["b"]],
    ["b", ["c"]],
    ["c", ["a", "d"]],
    ["d", []],
    ["e", ["e"]],
  ]);
  deepEqual(cycles(graph), [["a", "b", "c"], ["e"]]);
});

Deno.test("no import cycle between the service's files, type-only imports included", async () => {
  const graph = await importGraph();
  // The import pattern still reads this code: the service's files import each other hundreds of
  // times (an empty graph would have no cycle either).
  const imports = [...graph.values()].flat().length;
  assert(imports > 200, `only ${imports} local imports found: is IMPORT still right?`);
  const relative = (href: string) => href.slice(ROOT.href.length);
  deepEqual(cycles(graph).map((c) => c.map(relative)), []);
});
