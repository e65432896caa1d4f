/**
 * The session store of the service: opened (a remote one read once, so that
 * a wrong URL fails the start-up), and watched for room to write.
 *
 * @module
 */

import { type Config, ConfigError } from "../config/config.ts";
import { SessionStore } from "../sessions/session_store.ts";
import { checkHeadroom, storageFailure, StorageHealth } from "../sessions/storage_health.ts";
import type { WriteGenerations } from "../sessions/write_generations.ts";

/** The data folder cannot hold the session store: not a folder, or not writable. */
export class DataDirError extends Error {
  readonly code = "data_dir_unusable";
  constructor(message: string) {
    super(message);
    this.name = "DataDirError";
  }
}

/**
 * Makes `--data-dir` (and its parents) if it is missing, and checks that it
 * is a folder this process can write, so that a start-up it cannot serve
 * stops with the reason in one line (SQLite's own words, "unable to open
 * database file", name neither the folder nor the fault).
 */
export async function prepareDataDir(dir: string): Promise<void> {
  const unusable = (why: string, fix: string) =>
    new DataDirError(
      `the data folder ${dir} (--data-dir) ${why}: ${fix}, or give another --data-dir`,
    );
  try {
    await Deno.mkdir(dir, { recursive: true });
  } catch (error) {
    if (error instanceof Deno.errors.AlreadyExists) {
      throw unusable("is a file, not a folder", "move the file away");
    }
    throw unusable(`cannot be made (${(error as Error).message})`, "make its parent writable");
  }
  // A read-only file system, or a folder of another user: a file of our own cannot be made.
  const probe = `${dir}/.write-check-${Deno.pid}`;
  try {
    await Deno.writeTextFile(probe, "");
  } catch (error) {
    if (error instanceof Deno.errors.NotCapable) throw error;
    // No room: opening the store below says so, with what to do about it.
    if (/^the disk (is full|quota)/.test(storageFailure(error) ?? "")) return;
    throw unusable(`cannot be written (${(error as Error).message})`, "make it writable");
  }
  await Deno.remove(probe).catch(() => {});
}

/** Room a store that ran out of space must have again before it takes turns. */
const STORAGE_HEADROOM_BYTES = 1024 * 1024;

/**
 * Checks that the session store can be written, and keeps checking.
 *
 * A store that cannot be written at start-up (a full disk) stops the start
 * with the reason, rather than starting not ready: opening a store needs room
 * too (SQLite writes its `-shm` and `-wal` files; on a full disk it fails with
 * "disk I/O error"), and so does each request worker's own connection, so a
 * process started on a full disk would have no store to come back with. The
 * process manager starts it again (the systemd unit: `Restart=on-failure`,
 * every 5 s), and meanwhile the broker keeps the requests sent to it (a
 * persistent session). A store that fills up while the service runs is
 * watched instead: turns are refused until the probe finds room again.
 */
export async function watchStorage(store: SessionStore, config: Config): Promise<StorageHealth> {
  const local = config.kvUrl === undefined;
  const health = new StorageHealth({
    probe: async (down) => {
      await store.probe(config.mqttClientId);
      // A local disk that filled up must have room for more than one record again.
      if (down && local) await checkHeadroom(config.dataDir, STORAGE_HEADROOM_BYTES);
    },
  });
  if (!(await health.probeNow())) {
    throw new Error(
      `the session store ${config.kvUrl ?? config.dataDir} cannot be written (${health.reason}): ` +
        `free some space on its disk and start again; its sessions are kept`,
    );
  }
  return health.start();
}

/**
 * Opens the session store; a remote one is read once, so that a wrong URL or
 * token stops the start-up with its reason instead of failing every request.
 */
export async function openStore(
  path: string,
  config: Config,
  generations: WriteGenerations | undefined,
): Promise<SessionStore> {
  if (config.kvUrl === undefined) {
    try {
      return await SessionStore.open(path, config.sessionTtlMs, generations);
    } catch (error) {
      // SQLite's "disk I/O error" here most often means no room for its `-shm` file.
      const why = storageFailure(error);
      if (why === undefined) throw error;
      const full = await checkHeadroom(config.dataDir, 64 * 1024).then(() => false, () => true);
      throw new Error(
        `the session store ${path} cannot be opened (${full ? "the disk is full" : why}): ` +
          `free some space on its disk and start again; its sessions are kept`,
      );
    }
  }
  let store: SessionStore | undefined;
  try {
    store = await SessionStore.open(path, config.sessionTtlMs);
    await store.load("_", "_");
    return store;
  } catch (error) {
    store?.close();
    throw new ConfigError(
      `'--kv-url' ${config.kvUrl} cannot be used (is DENO_KV_ACCESS_TOKEN set, and --allow-net given for its host?): ${
        (error as Error).message
      }`,
    );
  }
}
