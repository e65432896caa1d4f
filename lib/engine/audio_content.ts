/**
 * Audio on the way to the engine: a clip as the OpenAI content part vLLM
 * takes, what a message's clips count for, the engine's refusal of audio (a
 * model that takes none) told apart from other errors, and what the
 * simulated engine says it heard.
 *
 * WAV and MP3 go as `input_audio` parts (`{"data": base64, "format": "wav"
 * | "mp3"}`), the OpenAI form, which vLLM, OpenAI and llama.cpp all read; FLAC
 * and Ogg as `audio_url` parts holding a data URL, vLLM's own form, since the
 * OpenAI schema vLLM validates `input_audio` against names only wav and mp3.
 * vLLM turns both into the same data URL and decodes it by content.
 *
 * @module
 */

import {
  AUDIO_MEDIA_TYPES,
  type AudioInput,
  audioTokenBound,
  audioTokens,
  formatSeconds,
} from "../protocol/audio.ts";
import { type AudioHeader, DECODED_CODECS, readAudioHeader } from "../protocol/audio_header.ts";
import { ServiceError } from "../protocol/errors.ts";
import { refusedText } from "./engine_errors.ts";

/** An audio content part, as vLLM's chat API takes it. */
export type AudioPart =
  | {
    readonly type: "input_audio";
    readonly input_audio: { readonly data: string; readonly format: "wav" | "mp3" };
  }
  | { readonly type: "audio_url"; readonly audio_url: { readonly url: string } };

/** The content part a checked clip is sent as. */
export function audioPart(clip: Pick<AudioInput, "url" | "kind">): AudioPart {
  if (clip.kind === "wav" || clip.kind === "mp3") {
    const data = clip.url.slice(clip.url.indexOf(",") + 1);
    return { type: "input_audio", input_audio: { data, format: clip.kind } };
  }
  return { type: "audio_url", audio_url: { url: clip.url } };
}

/** The base64 of each audio part of a message's content, with the format it claims. */
function audioDataOf(content: unknown): { base64: string; claimed: string }[] {
  if (!Array.isArray(content)) return [];
  const found: { base64: string; claimed: string }[] = [];
  for (const part of content) {
    if (part?.type === "input_audio" && typeof part.input_audio?.data === "string") {
      found.push({ base64: part.input_audio.data, claimed: String(part.input_audio.format) });
    } else if (part?.type === "audio_url" && typeof part.audio_url?.url === "string") {
      const url: string = part.audio_url.url;
      const comma = url.indexOf(",");
      if (/^data:[^,]*;base64,/i.test(url)) {
        found.push({ base64: url.slice(comma + 1), claimed: url.slice(5, url.indexOf(";")) });
      } else {
        found.push({ base64: "", claimed: url });
      }
    }
  }
  return found;
}

/** The header of a clip given as base64; undefined when it is not one or cannot be read. */
function headerOf(base64: string): (AudioHeader & { bytes: number }) | undefined {
  let bytes: Uint8Array;
  try {
    bytes = (Uint8Array as unknown as { fromBase64(t: string): Uint8Array }).fromBase64(base64);
  } catch {
    return undefined;
  }
  const header = readAudioHeader(bytes);
  return header && { ...header, bytes: bytes.length };
}

/** Whether a message's content holds audio parts. */
export function hasAudio(content: unknown): boolean {
  return Array.isArray(content) &&
    content.some((part) => part?.type === "input_audio" || part?.type === "audio_url");
}

/** Roughly the prompt tokens of a message's clips (see {@linkcode audioTokens}). */
export function audioTokensOf(content: unknown): number {
  let tokens = 0;
  for (const { base64 } of audioDataOf(content)) {
    tokens += audioTokens(headerOf(base64)?.seconds ?? 30);
  }
  return tokens;
}

/** The most prompt tokens a message's clips may count for (see {@linkcode audioTokenBound}). */
export function audioTokenBoundOf(content: unknown): number {
  let tokens = 0;
  for (const { base64 } of audioDataOf(content)) {
    const header = headerOf(base64);
    tokens += audioTokenBound(header?.seconds ?? 600, header?.estimated ?? true);
  }
  return tokens;
}

/**
 * How engines say they take no audio: vLLM serving a text-only model ("... is
 * not a multimodal model"), or a model without audio or above its limit
 * ("At most 0 audio(s) may be provided in one prompt."); llama.cpp without an
 * audio projector ("audio input is not supported"); OpenAI ("... does not
 * support audio", "input_audio is only supported by certain models").
 */
const NO_AUDIO =
  /not a multimodal model|At most \d+ audio\(s\)|audio input is not supported|does not support (?:audio|multi-?modal)|input_audio is only supported|audio[^.]{0,40}not supported/i;

/** A vLLM without its audio extra: the loader's libraries are missing. */
const NO_AUDIO_LOADER = /install vllm\[audio\]|No module named '?(?:librosa|soundfile)/i;

/**
 * The client's error when the engine refused a request with audio because
 * the served model takes none (or not that many clips): `invalid_request`,
 * never retried; a vLLM that cannot decode audio at all (its audio extra
 * missing): `internal`, not retried and not counted against the engine's
 * health, as retrying would fail again; undefined for any other error, or a
 * request without audio.
 */
export function audioRefusal(
  error: unknown,
  messages: readonly { readonly content: unknown }[],
): ServiceError | undefined {
  if (!messages.some((message) => hasAudio(message.content))) return undefined;
  const refused = refusedText(error);
  if (!refused) return undefined;
  const { status, text, detail } = refused;
  if (NO_AUDIO_LOADER.test(text)) {
    return new ServiceError(
      "internal",
      `the engine cannot decode audio: vLLM lacks its audio extra (pip install "vllm[audio]") ` +
        `(the engine answered ${status}: ${detail})`,
      { cause: error },
    );
  }
  if (!NO_AUDIO.test(text)) return undefined;
  const limit = /At most (\d+) audio\(s\)/i.exec(text);
  const images = messages.some((message) =>
    Array.isArray(message.content) &&
    message.content.some((part) => part?.type === "image_url")
  );
  const what = limit && limit[1] !== "0"
    ? `the served model takes at most ${limit[1]} audio clip${
      limit[1] === "1" ? "" : "s"
    } a request`
    : limit || !images
    ? "the served model does not accept audio; send text"
    : "the served model does not accept images or audio; send text only";
  return new ServiceError(
    "invalid_request",
    `${what} (the engine answered ${status}: ${detail})`,
    { cause: error },
  );
}

/**
 * vLLM's 400 for a request holding a clip its loader cannot decode (soundfile's
 * error, as the chat endpoint passes it on), for the simulated engine to
 * refuse what vLLM refuses; undefined when every clip is one it decodes.
 */
export function undecodableAudio(messages: readonly { content: unknown }[]): string | undefined {
  for (const message of messages) {
    for (const { base64, claimed } of audioDataOf(message.content)) {
      // A remote URL vLLM would fetch; the simulated engine fetches nothing, and takes it.
      if (/^https?:/i.test(claimed)) continue;
      const header = base64 === "" ? undefined : headerOf(base64);
      if (!header || !DECODED_CODECS.has(header.codec)) {
        return "Error opening <_io.BytesIO object>: Format not recognised. None";
      }
    }
  }
  return undefined;
}

/**
 * What the simulated engine says it heard in the last user message's clips,
 * read from their headers: ` Heard 1 audio clip: wav/pcm 0.85 s, 13,614 bytes.`;
 * empty without audio.
 */
export function heardAudio(messages: readonly { role: string; content: unknown }[]): string {
  const clips = audioDataOf(messages.findLast((m) => m.role === "user")?.content);
  if (clips.length === 0) return "";
  const each = clips.map(({ base64, claimed }) => {
    if (/^https?:/i.test(claimed) && URL.canParse(claimed)) {
      return `remote ${new URL(claimed).host}`;
    }
    const header = headerOf(base64);
    if (!header) return `unreadable (${claimed.slice(0, 40)})`;
    const type = AUDIO_MEDIA_TYPES[header.kind];
    return `${header.codec === header.kind ? header.kind : `${header.kind}/${header.codec}`} ` +
      `${header.estimated ? "~" : ""}${formatSeconds(header.seconds)}, ` +
      `${header.bytes.toLocaleString("en-US")} bytes${
        claimed === header.kind || claimed === type ? "" : ` (sent as ${claimed})`
      }`;
  });
  return ` Heard ${clips.length} audio clip${clips.length === 1 ? "" : "s"}: ${each.join(", ")}.`;
}
