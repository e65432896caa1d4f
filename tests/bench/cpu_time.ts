/** CPU time of a process, as the CPU benchmark reads it. @module */

/** User + system CPU time of process `pid`, all threads, in milliseconds. */
export function cpuMs(pid: number): number {
  const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  // Fields after the command name (which may hold spaces), in parentheses.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  // utime and stime are fields 14 and 15 of the line, in clock ticks (100 a second on Linux).
  return (Number(fields[11]) + Number(fields[12])) * 10;
}

/**
 * CPU time of each thread of process `pid` (by id and name), user and system,
 * in milliseconds, and how many times it went to sleep (voluntary context
 * switches: each one is a wake-up later, which costs CPU of its own).
 */
export function threadCpuMs(
  pid: number,
): Map<string, [user: number, system: number, sleeps: number]> {
  const threads = new Map<string, [number, number, number]>();
  for (const entry of Deno.readDirSync(`/proc/${pid}/task`)) {
    try {
      const stat = Deno.readTextFileSync(`/proc/${pid}/task/${entry.name}/stat`);
      const name = stat.slice(stat.indexOf("(") + 1, stat.lastIndexOf(")"));
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      const status = Deno.readTextFileSync(`/proc/${pid}/task/${entry.name}/status`);
      const sleeps = Number(/voluntary_ctxt_switches:\s+(\d+)/.exec(status)?.[1] ?? 0);
      threads.set(`${entry.name} ${name}`, [
        Number(fields[11]) * 10,
        Number(fields[12]) * 10,
        sleeps,
      ]);
    } catch { /* gone */ }
  }
  return threads;
}
