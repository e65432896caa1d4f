/**
 * The served projects, read from the prompts folder: each one's system prompt
 * and the settings of its front matter.
 *
 * @module
 */

import { join } from "node:path";
import { type Config, ConfigError } from "../config/config.ts";
import { closest } from "../_util.ts";
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
 * create; unless its name is a letter or two from a prompt file's, which
 * stops the start-up as the typo it most likely is. A file that cannot be read for another reason (permissions), or
 * whose front matter cannot be used, stops the start-up.
 */
export async function loadProjects(config: Config): Promise<Map<string, Project>> {
  const projects = new Map<string, Project>();
  const read = (name: string) => readProjectFile(name, join(config.promptsDir, `${name}.md`));
  let general: string | undefined;
  let fileNames: string[] | undefined;
  for (const project of config.projects) {
    const file = await read(project);
    if (file !== undefined) {
      projects.set(project, file);
      continue;
    }
    // A name a letter or two from a prompt file's (`--projects mazee`) is a typo, not a new
    // project: served with the general prompt, its clients would get answers from the wrong
    // prompt with nothing said but one warning.
    fileNames ??= await promptFileNames(config.promptsDir);
    const meant = closest(project, fileNames, project.length <= 4 ? 1 : 2);
    if (meant !== undefined) {
      const path = join(config.promptsDir, `${project}.md`);
      throw new ConfigError(
        `project '${project}' has no prompt file (${path}): did you mean '${meant}'? ` +
          `To serve '${project}' with the general prompt on purpose, create ${path} ` +
          "(a copy of general.md will do)",
        { code: "bad_value", option: "projects", value: project },
      );
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

/** The names of the prompt files in `dir` (`maze` for `maze.md`). */
async function promptFileNames(dir: string): Promise<string[]> {
  const names: string[] = [];
  for await (const entry of Deno.readDir(dir)) {
    if (entry.isFile && entry.name.endsWith(".md")) names.push(entry.name.slice(0, -3));
  }
  return names;
}

/**
 * A project's `model` must be one the engine serves: the model, or a LoRA
 * adapter of `--lora-modules` (managed vLLM, simulated engine). An attached
 * engine's own list is checked when it is attached (`engine/start_engines.ts`).
 */
function checkModels(projects: ReadonlyMap<string, Project>, config: Config): void {
  if (config.engine === "url") return;
  const served = [config.servedModelName, ...config.loraModules.map(({ name }) => name)];
  for (const project of projects.values()) {
    const asked = [
      { key: "model", model: project.model },
      ...(project.experiment?.variants ?? []).map((v) => ({
        key: `variants (${v.name}).model`,
        model: v.model,
      })),
    ];
    for (const { key, model } of asked) {
      if (model === undefined || served.includes(model)) continue;
      throw new ConfigError(
        `${project.file}: front matter key '${key}': ${model} is not served: ` +
          `add '--lora-modules ${model}=PATH' (served now: ${served.join(", ")})`,
      );
    }
  }
}
