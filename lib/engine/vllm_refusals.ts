/**
 * What vLLM refuses in a chat completion request before it generates, with
 * its status and its words, so that the simulated engine refuses the same
 * (a request the simulator takes is one a real vLLM takes too). Read in
 * vLLM's source (v0.11.0, which `vllm.Dockerfile` pins, and later):
 *
 * - `tool_choice: "auto"` (the default when `tools` are given,
 *   vllm/entrypoints/openai/protocol.py) without `--enable-auto-tool-choice
 *   --tool-call-parser`: 400 (vllm/entrypoints/openai/serving_chat.py).
 *   Current vLLM refuses `"required"` without a tool-call parser too (v0.11.0
 *   served it by guided decoding); that refusal is worded here in the same
 *   way, as its wording was not found in the sources read.
 * - `top_p` outside (0, 1]: 400 from `SamplingParams` (vllm/sampling_params.py).
 * - a base64 image or audio clip without its padding: vLLM decodes images
 *   with `validate=True` (vllm/multimodal/image.py) and audio with
 *   `base64.b64decode` (vllm/multimodal/audio.py), both of which fail with
 *   "Incorrect padding". (`input_audio` data is made into such a data URL.)
 *
 * Refusals that come after the 200 of a stream (the prompt's length with its
 * images, found by the engine once the images are processed) are in
 * `simulator.ts`.
 *
 * @module
 */

import type { ChatBody } from "./simulated_reply.ts";

/** How the simulated vLLM was started, as far as refusals go. */
export interface RefusalSettings {
  /** `--tool-call-parser` (with `--enable-auto-tool-choice`); undefined: not given. */
  readonly toolParser?: string;
}

/** A refusal: the HTTP status and vLLM's message. */
export interface Refusal {
  readonly status: number;
  readonly message: string;
}

/** The `tool_choice` vLLM acts on: `"auto"` when tools are given without one. */
export function effectiveToolChoice(body: ChatBody): ChatBody["tool_choice"] {
  if (body.tool_choice !== undefined) return body.tool_choice;
  return Array.isArray(body.tools) && body.tools.length > 0 ? "auto" : undefined;
}

/** vLLM's refusal of `body`, or undefined when vLLM would start generating. */
export function refusalOf(body: ChatBody, settings: RefusalSettings): Refusal | undefined {
  const topP = (body as { top_p?: unknown }).top_p;
  if (typeof topP === "number" && !(topP > 0 && topP <= 1)) {
    return { status: 400, message: `top_p must be in (0, 1], got ${pythonFloat(topP)}.` };
  }
  const choice = effectiveToolChoice(body);
  if (settings.toolParser === undefined && Array.isArray(body.tools) && body.tools.length > 0) {
    if (choice === "auto") {
      return {
        status: 400,
        message:
          '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
      };
    }
    if (choice === "required") {
      return {
        status: 400,
        message: '"required" tool choice requires --tool-call-parser to be set',
      };
    }
  }
  for (const message of body.messages ?? []) {
    if (!Array.isArray(message.content)) continue;
    for (const part of message.content as MediaPart[]) {
      const data = base64Of(part);
      if (data !== undefined && data.length % 4 !== 0) {
        return { status: 400, message: "Incorrect padding" };
      }
    }
  }
  return undefined;
}

/** A content part that may carry base64 media. */
interface MediaPart {
  readonly type?: string;
  readonly image_url?: { readonly url?: unknown };
  readonly audio_url?: { readonly url?: unknown };
  readonly input_audio?: { readonly data?: unknown };
}

/** The base64 of a part's image or audio, when it carries it inline. */
function base64Of(part: MediaPart): string | undefined {
  if (part?.type === "input_audio") {
    const data = part.input_audio?.data;
    return typeof data === "string" ? data : undefined;
  }
  const url = part?.type === "image_url"
    ? part.image_url?.url
    : part?.type === "audio_url"
    ? part.audio_url?.url
    : undefined;
  if (typeof url !== "string" || !/^data:[^,]*;base64,/i.test(url)) return undefined;
  return url.slice(url.indexOf(",") + 1);
}

/** A number as Python prints a float (`0.0`, `1.5`). */
function pythonFloat(value: number): string {
  return Number.isInteger(value) ? value.toFixed(1) : String(value);
}
