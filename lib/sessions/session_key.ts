/**
 * The one string that names a session across the service: its project and id. Queues, caches,
 * rate limits and worker affinity all key on it, so they agree on what "the same session" is.
 *
 * @module
 */

/** `project/sessionId`: unambiguous because a project name never contains `/`. */
export function sessionKey(project: string, sessionId: string): string {
  return `${project}/${sessionId}`;
}
