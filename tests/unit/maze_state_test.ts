import { deepEqual, equal } from "node:assert/strict";
import { boxedIn } from "../../lib/games/maze_state.ts";

/** As docs/protocol.md says: `visible_map[y][x]`, 1 floor, 0 wall, positions `[x, y]`. */
Deno.test("maze state: visible_map is rows of cells, indexed [y][x], 0 a wall and 1 floor", () => {
  // A map wider than it is tall, so that x and y cannot be swapped unnoticed: the player at
  // [3, 1] has floor only to the west ([2, 1], row 1 column 2).
  const map = [
    [0, 0, 0, 0, 0, 0],
    [0, 0, 1, 1, 0, 0],
    [0, 0, 0, 0, 0, 0],
  ];
  equal(boxedIn(JSON.stringify({ player_pos: [3, 1], visible_map: map })), undefined);
  // Wall it in: the first wall looking east, south, west, north is east of it, [4, 1].
  map[1][2] = 0;
  deepEqual(boxedIn(JSON.stringify({ player_pos: [3, 1], visible_map: map })), [4, 1]);
  // Off the map counts as closed: at the east edge, the first wall is south.
  deepEqual(boxedIn(JSON.stringify({ player_pos: [5, 1], visible_map: map })), [5, 2]);
});
