/**
 * The served projects, read from the prompts folder: each one's system prompt
 * and the settings of its front matter.
 *
 * @module
 */

import { join } from "node:path";
import { type Config, ConfigError } from "../config/config.ts";
import { logger } from "../log.ts";
import { plainProject, type Project, readProjectFile } from "../projects/project_file.ts";

const log = logger("service");

/** The general prompt when the prompts folder has none (`general.md`). */
const FALLBACK_PROMPT = "You are a helpful assistant. Answer clearly, concisely and accurately.";

/**
 * Reads `prompts/NAME.md` for every project (its system prompt, after a YAML
 * front matter if it has one: see `projects/project_file.ts`). A project
 * without one is served with the general prompt (`general.md`) and nothing
 * else, as the original did for any name, and a warning names the file to
 * create. A file that cannot be read for another reason (permissions), or
 * whose front matter cannot be used, stops the start-up.
 */
export async function loadProjects(config: Config): Promise<Map<string, Project>> {
  const projects = new Map<string, Project>();
  const read = (name: string) => readProjectFile(name, join(config.promptsDir, `${name}.md`));
  let general: string | undefined;
  for (const project of config.projects) {
    const file = await read(project);
    if (file !== undefined) {
      projects.set(project, file);
      continue;
    }
    general ??= (await read("general"))?.prompt ?? FALLBACK_PROMPT;
    projects.set(project, plainProject(project, general));
    log.warn(
      "Project {project} has no system prompt: serving it with the general prompt; create {path} for its own",
      { project, path: join(config.promptsDir, `${project}.md`) },
    );
  }
  checkModels(projects, config);
  return projects;
}

/**
 * A project's `model` must be one the engine serves: the model, or a LoRA
 * adapter of `--lora-modules` (managed vLLM, simulated engine). An attached
 * engine's own list is checked when it is attached (`engine/start_engine.ts`).
 */
function checkModels(projects: ReadonlyMap<string, Project>, config: Config): void {
  if (config.engine === "url") return;
  const served = [config.servedModelName, ...config.loraModules.map(({ name }) => name)];
  for (const project of projects.values()) {
    if (project.model === undefined || served.includes(project.model)) continue;
    throw new ConfigError(
      `${project.file}: front matter key 'model': ${project.model} is not served: ` +
        `add '--lora-modules ${project.model}=PATH' (served now: ${served.join(", ")})`,
    );
  }
}
