/**
 * The live page's HTTP answers, with the headers every one of them needs.
 * Private to `lib/` (the operator's experiment paths answer with them too).
 *
 * @module
 */

/**
 * Headers of every page, file and stream the live page serves: no sniffing of
 * types, no referrer sent to another origin (`same-origin` rather than
 * `no-referrer`, under which a browser posts the page's own sign-in form with
 * `Origin: null`, refused as another origin's), no framing by another page, and scripts and
 * styles from this origin only (uPlot sets inline styles on its charts).
 */
export const SECURITY_HEADERS: Readonly<Record<string, string>> = {
  "x-content-type-options": "nosniff",
  "referrer-policy": "same-origin",
  "x-frame-options": "DENY",
  "content-security-policy":
    "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
};

/** One of the page's files, revalidated on each load (a new version shows at once). */
export function asset(body: string | Uint8Array, type: string): Response {
  return new Response(body as BodyInit, {
    headers: { "content-type": type, "cache-control": "no-cache", ...SECURITY_HEADERS },
  });
}

/** An HTML page. */
export function page(html: string, status: number, headers: Record<string, string> = {}): Response {
  return new Response(html, {
    status,
    headers: { "content-type": "text/html; charset=utf-8", ...SECURITY_HEADERS, ...headers },
  });
}

/** A plain-text answer, for a person reading it (an error, mostly). */
export function plainText(
  body: string,
  status: number,
  headers: Record<string, string> = {},
): Response {
  return new Response(body, {
    status,
    headers: { "content-type": "text/plain; charset=utf-8", ...headers },
  });
}

/** A JSON answer, never cached. */
export function json(body: unknown, status = 200): Response {
  return Response.json(body, { status, headers: { "cache-control": "no-store" } });
}

/** "See other": back to `location` after a form was posted. */
export function redirect(location: string, headers: Record<string, string> = {}): Response {
  return new Response(null, { status: 303, headers: { location, ...headers } });
}
