/**
 * A reader of server-sent events (`text/event-stream`), the framing of a
 * streamed chat completion: only each event's `data` is of use here.
 *
 * It is on the per-token path: each token the engine streams is one event,
 * so the reader keeps one text buffer and slices lines out of it in place.
 *
 * @module
 */

/**
 * The `data` of each server-sent event in `body` (lines end in `\n` or
 * `\r\n`; other fields and comments are skipped; the lines of a multi-line
 * `data` are joined with `\n`). Breaking off cancels the body.
 */
export async function* sseData(body: AsyncIterable<Uint8Array> | null): AsyncGenerator<string> {
  if (body === null) return;
  const decoder = new TextDecoder();
  let buffer = "";
  let data: string[] = [];
  const field = (line: string) => {
    if (line.endsWith("\r")) line = line.slice(0, -1);
    if (line.startsWith("data:")) data.push(line.slice(line.charCodeAt(5) === 0x20 ? 6 : 5));
  };
  for await (const bytes of body) {
    buffer += decoder.decode(bytes, { stream: true });
    let start = 0;
    for (let end; (end = buffer.indexOf("\n", start)) !== -1; start = end + 1) {
      const blank = end === start || (end === start + 1 && buffer.charCodeAt(start) === 0x0d);
      if (!blank) {
        field(buffer.slice(start, end));
      } else if (data.length > 0) {
        yield data.join("\n");
        data = [];
      }
    }
    buffer = buffer.slice(start);
  }
  // A last event may lack its blank line.
  field(buffer + decoder.decode());
  if (data.length > 0) yield data.join("\n");
}
