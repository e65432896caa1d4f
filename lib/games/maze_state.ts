/**
 * A game's state message, made into the user turn of its session the way the
 * original deployment made it: a compact JSON of the normalised state
 * (`player_pos`, `exit_pos`, `visible_map`, `germs`, `oxygen`,
 * `oxygen_collected`), positions as `[x, y]` whether the game sent `{x, y}`
 * or `[x, y]`, under either the snake_case or the camelCase names the maze
 * clients use.
 *
 * @module
 */

/** A state message read: its session, the user turn it makes, and the session's prompt if it sets one. */
export interface StateMessage {
  readonly sessionId: string;
  /** The normalised state as compact JSON: the user turn. */
  readonly message: string;
  /** `prompt_template.content` (the web maze's template) or `systemPrompt`. */
  readonly systemPrompt: string | undefined;
  /** Sampling parameters the state carries, as the original took them (`temperature`, `topP`, `maxTokens`). */
  readonly params: Readonly<Record<string, number>>;
}

/** Why a state cannot be used, and the session to tell, when it names one. */
export class StateError extends Error {
  readonly sessionId: string | undefined;
  constructor(message: string, sessionId: string | undefined) {
    super(message);
    this.name = "StateError";
    this.sessionId = sessionId;
  }
}

/** The largest map side taken (a game's whole maze is far smaller). */
const MAX_MAP_SIDE = 256;
/** The most germs or oxygen pellets taken. */
const MAX_ITEMS = 1024;
const MAX_PROMPT_CHARS = 32_768;

type Cell = [number, number];

/**
 * Reads a state message; one on a session's own state topic may leave its
 * session id out (`topicSessionId`).
 *
 * @throws {StateError} for a payload that is not a JSON object, names no
 * valid session, or holds a position or map of the wrong shape.
 */
export function parseState(
  payload: Uint8Array,
  sessionPattern: RegExp,
  topicSessionId?: string,
): StateMessage {
  let state: unknown;
  try {
    state = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(payload));
  } catch {
    throw new StateError("the state is not UTF-8 JSON", undefined);
  }
  if (typeof state !== "object" || state === null || Array.isArray(state)) {
    throw new StateError("the state must be a JSON object", undefined);
  }
  const fields = state as Record<string, unknown>;
  let sessionId: string | undefined;
  const named = fields.sessionId ?? fields.session_id ?? topicSessionId;
  if (typeof named === "number" && Number.isFinite(named)) sessionId = String(named);
  else if (typeof named === "string" && named.trim() !== "") sessionId = named.trim();
  if (sessionId === undefined) {
    throw new StateError("the state names no session ('sessionId' or 'session_id')", undefined);
  }
  if (!sessionPattern.test(sessionId)) {
    throw new StateError(`session id ${JSON.stringify(sessionId)} is not valid`, undefined);
  }
  const fail = (message: string): never => {
    throw new StateError(message, sessionId);
  };
  return {
    sessionId,
    message: stateMessage(fields, fail),
    systemPrompt: promptOf(fields, fail),
    params: paramsOf(fields, fail),
  };
}

/** The user turn of a state: the compact JSON of its normalised fields. */
export function stateMessage(
  state: Record<string, unknown>,
  fail: (message: string) => never = (message) => {
    throw new StateError(message, undefined);
  },
): string {
  const field = (...names: string[]) => {
    for (const name of names) {
      if (state[name] !== undefined && state[name] !== null) return state[name];
    }
    return undefined;
  };
  const player = field("player_pos", "playerPosition", "playerPos");
  if (player === undefined) fail("the state has no 'player_pos' (or 'playerPosition')");
  const exit = field("exit_pos", "exitPosition", "exitPos");
  const map = field("visible_map", "visibleMap");
  const collected = field("oxygenCollected", "oxygen_collected") ?? 0;
  if (typeof collected !== "number" || !Number.isFinite(collected)) {
    fail("'oxygenCollected' must be a number");
  }
  return JSON.stringify({
    player_pos: cell(player, "player_pos", fail),
    ...(exit !== undefined && { exit_pos: cell(exit, "exit_pos", fail) }),
    visible_map: map === undefined ? [] : visibleMap(map, fail),
    germs: cells(field("germs") ?? [], "germs", fail),
    oxygen: cells(field("oxygenPellets", "oxygen_pellets") ?? [], "oxygenPellets", fail),
    oxygen_collected: collected,
  });
}

/** `[x, y]` from `{x, y}` or `[x, y]` of whole (or truncated) numbers. */
function cell(value: unknown, name: string, fail: (message: string) => never): Cell {
  let x: unknown, y: unknown;
  if (Array.isArray(value) && value.length === 2) [x, y] = value;
  else if (typeof value === "object" && value !== null && "x" in value && "y" in value) {
    ({ x, y } = value as { x: unknown; y: unknown });
  }
  if (
    typeof x !== "number" || typeof y !== "number" || !Number.isFinite(x) || !Number.isFinite(y)
  ) {
    return fail(`'${name}' must be [x, y] or {"x": .., "y": ..} with numbers`);
  }
  return [Math.trunc(x), Math.trunc(y)];
}

function cells(value: unknown, name: string, fail: (message: string) => never): Cell[] {
  if (!Array.isArray(value)) return fail(`'${name}' must be a list of positions`);
  if (value.length > MAX_ITEMS) fail(`'${name}' holds more than ${MAX_ITEMS} positions`);
  return value.map((item, i) => cell(item, `${name}[${i}]`, fail));
}

function visibleMap(value: unknown, fail: (message: string) => never): number[][] {
  if (!Array.isArray(value) || value.length > MAX_MAP_SIDE) {
    return fail(`'visible_map' must be a list of rows (at most ${MAX_MAP_SIDE})`);
  }
  return value.map((row, y) => {
    if (!Array.isArray(row) || row.length > MAX_MAP_SIDE) {
      return fail(`'visible_map[${y}]' must be a list of cells (at most ${MAX_MAP_SIDE})`);
    }
    return row.map((tile, x) => {
      if (typeof tile === "boolean") return tile ? 1 : 0;
      if (typeof tile !== "number" || !Number.isFinite(tile)) {
        return fail(`'visible_map[${y}][${x}]' must be a number`);
      }
      return tile;
    });
  });
}

function promptOf(
  state: Record<string, unknown>,
  fail: (message: string) => never,
): string | undefined {
  const template = state.prompt_template;
  let prompt: unknown = typeof template === "object" && template !== null
    ? (template as Record<string, unknown>).content
    : template;
  if (typeof prompt !== "string" || prompt.trim() === "") prompt = state.systemPrompt;
  if (prompt === undefined || prompt === null) return undefined;
  if (typeof prompt !== "string") return fail("'prompt_template.content' must be a string");
  if (prompt.length > MAX_PROMPT_CHARS) {
    fail(`'prompt_template.content' is longer than ${MAX_PROMPT_CHARS} characters`);
  }
  return prompt.trim() === "" ? undefined : prompt;
}

function paramsOf(
  state: Record<string, unknown>,
  fail: (message: string) => never,
): Record<string, number> {
  const params: Record<string, number> = {};
  for (
    const [name, names] of [
      ["temperature", ["temperature"]],
      ["top_p", ["topP", "top_p"]],
      ["max_tokens", ["maxTokens", "max_tokens"]],
    ] as const
  ) {
    for (const alias of names) {
      const value = state[alias];
      if (value === undefined || value === null) continue;
      if (typeof value !== "number" || !Number.isFinite(value)) fail(`'${alias}' must be a number`);
      params[name] = value as number;
    }
  }
  return params;
}

/**
 * Whether the player of a state (as {@linkcode stateMessage} made it) is boxed
 * in, and where the first wall around it is: every cell beside the player
 * (east, south, west, north) is a wall (`0` in `visible_map`, where `1` is
 * floor) or off the map. Used by the simulated engine's tool rule.
 */
export function boxedIn(message: string): Cell | undefined {
  let state: { player_pos?: unknown; visible_map?: unknown };
  try {
    state = JSON.parse(message);
  } catch {
    return undefined;
  }
  const map = state?.visible_map;
  const player = state?.player_pos;
  if (!Array.isArray(map) || map.length === 0 || !Array.isArray(player)) return undefined;
  const [px, py] = player as number[];
  let firstWall: Cell | undefined;
  for (const [dx, dy] of [[1, 0], [0, 1], [-1, 0], [0, -1]]) {
    const x = px + dx, y = py + dy;
    const row = map[y];
    if (!Array.isArray(row) || x < 0 || x >= row.length) continue;
    if (row[x] !== 0) return undefined;
    firstWall ??= [x, y];
  }
  return firstWall;
}
