/**
 * The operator's control of running experiments, on the HTTP endpoint:
 *
 * - `GET /operator/experiments[/{project}]`: each experiment's variants,
 *   weights and the operator's decisions so far;
 * - `POST /operator/experiments/{project}` with `{"winner": "a"}`: ends the
 *   experiment, every session (running ones too) gets `a`; or with
 *   `{"stop": "b", "reason": "..."}`: stops `b` at once, its sessions move to
 *   the variants left by the same hash over their weights.
 *
 * Every instance reads the decision from the store within a second. The
 * paths need the live page's token (`--dashboard-token`, as
 * `Authorization: Bearer TOKEN` or the page's cookie); without one they are
 * served only where the endpoint listens on a loopback address.
 *
 * @module
 */

import type { Experiments } from "../gateway/experiments.ts";
import { isLoopback } from "../observability/dashboard.ts";
import { DashboardAuth } from "../observability/dashboard_auth.ts";
import { json, plainText } from "../observability/_util.ts";

const PREFIX = "/operator/experiments";

/** Who may use the paths, and what they act on. */
export interface ExperimentEndpointOptions {
  /** The live page's token; undefined: none. */
  readonly token: string | undefined;
  /** Where the HTTP endpoint listens: without a token, only a loopback address is served. */
  readonly httpHost: string;
  /** The experiments, once the service serves. */
  readonly experiments: () => Experiments | undefined;
  /** The served projects. */
  readonly projects: readonly string[];
}

/** The operator's experiment paths; `handle` answers those it owns, else undefined. */
export class ExperimentEndpoint {
  readonly #options: ExperimentEndpointOptions;
  readonly #auth: DashboardAuth;

  constructor(options: ExperimentEndpointOptions) {
    this.#options = options;
    this.#auth = new DashboardAuth(options.token);
  }

  /** The answer to `request` when its path is one of these, else undefined. */
  handle(request: Request, client: string): Promise<Response> | undefined {
    const path = new URL(request.url).pathname;
    if (path !== PREFIX && !path.startsWith(`${PREFIX}/`)) return undefined;
    return this.#answer(request, client, path);
  }

  async #answer(request: Request, client: string, path: string): Promise<Response> {
    const { token, httpHost } = this.#options;
    if (token === undefined && !isLoopback(httpHost)) {
      return plainText(
        "experiment control needs a token here: set VLLM_MQTT_DASHBOARD_TOKEN " +
          "(--dashboard-token)\n",
        403,
      );
    }
    const refused = await this.#auth.gate(request, client, path);
    if (refused) return refused;
    const experiments = this.#options.experiments();
    const project = decodeURIComponent(path.slice(PREFIX.length + 1));
    const running = this.#options.projects.filter((p) => experiments?.experiment(p));
    if (!experiments || (project !== "" && !running.includes(project))) {
      return plainText(
        `no experiment ${project === "" ? "" : `of project ${project} `}runs here ` +
          `(experiments: ${running.join(", ") || "none"})\n`,
        404,
      );
    }
    if (request.method === "GET" || request.method === "HEAD") {
      const report = (name: string) => ({
        project: name,
        salt: experiments.experiment(name)!.salt,
        variants: experiments.experiment(name)!.variants.map((v) => ({
          name: v.name,
          weight: v.weight,
          ...(v.model !== undefined && { model: v.model }),
          ...(v.promptFile !== undefined && { prompt: v.promptFile }),
        })),
        control: experiments.control(name) ?? null,
      });
      return json(project === "" ? running.map(report) : report(project));
    }
    if (request.method !== "POST" || project === "") {
      return plainText("method not allowed\n", 405, {
        allow: project === "" ? "GET" : "GET, POST",
      });
    }
    let body: unknown;
    try {
      body = await request.json();
    } catch {
      return plainText(
        'the body must be JSON: {"winner": "a"} or {"stop": "b", "reason": "..."}\n',
        400,
      );
    }
    const decision = readDecision(body, experiments, project);
    if (typeof decision === "string") return plainText(`${decision}\n`, 400);
    const control = await experiments.decide(project, decision);
    return json({ project, control });
  }
}

/** The operator's decision in `body`, or why it cannot be taken. */
function readDecision(
  body: unknown,
  experiments: Experiments,
  project: string,
): { winner: string } | { stop: string; reason: string } | string {
  const variants = experiments.experiment(project)!.variants;
  const names = variants.map((v) => v.name);
  const known = (name: unknown) =>
    typeof name === "string" && names.includes(name)
      ? undefined
      : `${JSON.stringify(name)} is not a variant of ${project} (variants: ${names.join(", ")})`;
  if (typeof body !== "object" || body === null || Array.isArray(body)) {
    return 'the body must be a JSON object: {"winner": "a"} or {"stop": "b", "reason": "..."}';
  }
  const { winner, stop, reason } = body as Record<string, unknown>;
  if ((winner === undefined) === (stop === undefined)) {
    return 'name either a "winner" (ends the experiment) or a variant to "stop"';
  }
  if (winner !== undefined) return known(winner) ?? { winner: winner as string };
  const unknown = known(stop);
  if (unknown) return unknown;
  if (reason !== undefined && (typeof reason !== "string" || reason.length > 500)) {
    return '"reason" must be a string of at most 500 characters';
  }
  const stopped = experiments.control(project)?.stopped ?? [];
  const left = variants.filter((v) => v.name !== stop && !stopped.includes(v.name) && v.weight > 0);
  if (left.length === 0) {
    return `stopping ${stop} would leave no variant with a weight: name a "winner" instead`;
  }
  return {
    stop: stop as string,
    reason: (reason as string | undefined) ?? "stopped by the operator",
  };
}
