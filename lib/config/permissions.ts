/**
 * The permissions a configuration needs, checked before anything starts, and
 * the exact command that grants them when `deno task start` does not.
 *
 * `deno task start` runs with deno.json's `service` set: the checkout's
 * `prompts`, `data` and `lib`, and the production folders `/var/lib/vllm-mqtt`
 * (data) and `/etc/vllm-mqtt` (prompts, password and certificate files). A
 * folder elsewhere needs a flag, which `deno task start` would pass to the
 * program instead of to Deno, so the program names the `deno run` command
 * with the set's lists widened. A flag given next to `-P` replaces the set's
 * list for its kind: the command repeats the set's entries.
 *
 * Both run with `--no-prompt`: a service has nobody to answer Deno's
 * permission prompts, and in a terminal Deno would stop at one for any access
 * the set does not grant, with the HTTP endpoint not answering meanwhile. One
 * such access happens at every start: the `debug` package (used by `mqtt` and
 * `aedes`) tries an optional `require("supports-color")`, which looks for a
 * `node_modules` folder in each parent folder of the checkout. Without a
 * terminal Deno refuses it silently and the `require` falls back; with
 * `--no-prompt` a terminal gets the same refusal, so the program behaves the
 * same under a terminal, systemd and the tests. What the configuration
 * itself needs is checked before anything starts (below), so no access the
 * service needs is ever refused unannounced.
 *
 * @module
 */

import { isAbsolute, join } from "node:path";
import type { Config } from "./config.ts";

/** deno.json's `service` set, as `deno task start` grants it (a test keeps the two equal). */
export const SERVICE_PERMISSIONS = {
  net: ["127.0.0.1", "localhost"],
  read: ["./prompts", "./data", "./lib", "/var/lib/vllm-mqtt", "/etc/vllm-mqtt"],
  write: ["./data", "/var/lib/vllm-mqtt"],
} as const;

/** Paths and hosts, by the kind of access they need. */
export interface Needs {
  read: string[];
  write: string[];
  net: string[];
}

const LOCAL_HOSTS = new Set(["127.0.0.1", "localhost"]);

/** What `config` reads, writes and connects to. */
export function requiredPermissions(config: Config): Needs {
  const read = [config.promptsDir, config.dataDir];
  for (const file of [config.mqttPasswordFile, config.tlsCa, config.tlsCert, config.tlsKey]) {
    if (file !== undefined) read.push(file);
  }
  const net: string[] = [];
  const host = (url: string | undefined) => {
    if (url === undefined || !URL.canParse(url)) return;
    // `[::1]` in a URL, `::1` for Deno.
    const name = new URL(url).hostname.replace(/^\[(.*)\]$/, "$1");
    if (name !== "" && !LOCAL_HOSTS.has(name)) net.push(name);
  };
  host(config.mqttUrl);
  if (config.engine === "url") config.engineUrls.forEach(host);
  host(config.kvUrl);
  if (config.httpPort !== 0 && !LOCAL_HOSTS.has(config.httpHost)) net.push(config.httpHost);
  return { read, write: [config.dataDir], net };
}

/** The part of `needs` this process lacks; undefined when it has all of it. */
export function missingPermissions(needs: Needs): Needs | undefined {
  const lacks = (descriptor: Deno.PermissionDescriptor) =>
    Deno.permissions.querySync(descriptor).state !== "granted";
  const missing: Needs = {
    read: needs.read.filter((path) => lacks({ name: "read", path })),
    write: needs.write.filter((path) => lacks({ name: "write", path })),
    net: needs.net.filter((host) => lacks({ name: "net", host })),
  };
  const count = missing.read.length + missing.write.length + missing.net.length;
  return count === 0 ? undefined : missing;
}

/**
 * When `missing` holds relative paths (the default `prompts` and `./data`)
 * that the permissions grant in `programDir` but not in the working folder:
 * the program was started from another folder, and that is what to say
 * (naming the permissions would send the user the wrong way).
 */
export function workingFolderAdvice(missing: Needs, programDir: string): string | undefined {
  const relative = (paths: string[]) => paths.filter((path) => !isAbsolute(path));
  const read = relative(missing.read);
  const write = relative(missing.write);
  if (read.length + write.length === 0) return undefined;
  const grantedThere = (name: "read" | "write") => (path: string) =>
    Deno.permissions.querySync({ name, path: join(programDir, path) }).state === "granted";
  if (!read.every(grantedThere("read")) || !write.every(grantedThere("write"))) return undefined;
  const folder = programDir.replace(/\/$/, "");
  const paths = [...new Set([...read, ...write])];
  return `run it in its own folder (cd ${folder}): ${paths.join(" and ")} ` +
    `${paths.length === 1 ? "is" : "are"} looked for in the working folder, and the permissions ` +
    `grant those in ${folder}; or name other folders with --prompts-dir and --data-dir`;
}

/**
 * What a permission error (`Requires write access to "/srv/x", run again with
 * the --allow-write flag`) asks for, when it is of a kind the command grants.
 */
export function neededBy(error: unknown): Needs | undefined {
  if (!(error instanceof Deno.errors.NotCapable)) return undefined;
  const found = /Requires (read|write|net) access to "([^"]+)"/.exec(error.message);
  if (!found) return undefined;
  const needs: Needs = { read: [], write: [], net: [] };
  needs[found[1] as keyof Needs].push(found[2]);
  return needs;
}

/**
 * The command that runs the program with `args` and `missing` granted: the
 * `service` set, its lists widened where `missing` needs it. Run it where
 * `deno task start` runs (the folder holding deno.json).
 */
export function grantingCommand(missing: Needs, args: readonly string[]): string {
  const flags: string[] = [];
  for (const kind of ["read", "write", "net"] as const) {
    if (missing[kind].length === 0) continue;
    const list = [...new Set([...SERVICE_PERMISSIONS[kind], ...missing[kind]])];
    flags.push(`--allow-${kind}=${list.join(",")}`);
  }
  return ["deno", "run", "-q", "--no-prompt", "-P=service", ...flags, "main.ts", ...args].map(
    shellQuote,
  )
    .join(" ");
}

/**
 * The message for a start-up that lacks permissions: what is missing, and
 * the command that works.
 */
export function permissionAdvice(missing: Needs, args: readonly string[]): string {
  const what = [
    ...missing.read.map((path) => `read ${path}`),
    ...missing.write.map((path) => `write ${path}`),
    ...missing.net.map((host) => `connect to ${host}`),
  ];
  return `this configuration needs permission to ${what.join(", ")}, which 'deno task start' ` +
    `does not grant; run, in the folder of deno.json:\n  ${grantingCommand(missing, args)}`;
}

/** `word` as one shell word: quoted only when it must be. */
function shellQuote(word: string): string {
  return /^[A-Za-z0-9_./:=,@%+-]+$/.test(word) ? word : `'${word.replaceAll("'", `'\\''`)}'`;
}
