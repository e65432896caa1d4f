/**
 * The TypeScript files under a folder, for the tests that read the source of
 * lib/ as text (import cycles, exported names).
 *
 * @module
 */

/** Every `.ts` file under `dir` (a folder URL ending in `/`), its subfolders included. */
export async function sourceFiles(dir: URL): Promise<URL[]> {
  const files: URL[] = [];
  for await (const entry of Deno.readDir(dir)) {
    const url = new URL(entry.name + (entry.isDirectory ? "/" : ""), dir);
    if (entry.isDirectory) files.push(...await sourceFiles(url));
    else if (entry.name.endsWith(".ts")) files.push(url);
  }
  return files;
}
