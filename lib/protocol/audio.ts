/**
 * Audio clips a request carries (`audio`): a player speaking to the model.
 * Checked on the gateway thread before anything reaches the engine, sent to
 * it as OpenAI audio content parts, and remembered in the session only as a
 * short marker, as images are.
 *
 * Each clip is a `data:audio/...;base64,...` URL or bare base64. It must
 * decode; be WAV, MP3, FLAC or Ogg (Opus or Vorbis) by its magic number and
 * headers, which is what vLLM's audio loader (libsndfile, through librosa)
 * decodes; be what its data URL says it is; have headers that give its length;
 * and be at most `--max-audio-bytes` decoded. A request holds at most
 * `--max-audio-clips` clips, lasting at most `--max-audio-duration` together.
 * Formats the engine would not decode (WebM and MP4 from browsers' recorders,
 * raw AAC, AMR) are refused here by name, with the conversion that makes them
 * one it does.
 *
 * @module
 */

import { base64Room, byteSize, DATA_URL, decodeBase64, firstBytes, OTHER_URL } from "./data_url.ts";
import {
  type AudioHeader,
  type AudioKind,
  DECODED_CODECS,
  readAudioHeader,
  sniffAudio,
} from "./audio_header.ts";

/** An audio clip as checked: what the engine is sent, and what the marker says of it. */
export interface AudioInput {
  /** A base64 data URL naming the clip's real type (`audio/wav`, `audio/mpeg`, ...). */
  readonly url: string;
  readonly kind: AudioKind;
  readonly codec: string;
  /** Decoded size in bytes. */
  readonly bytes: number;
  readonly seconds: number;
  /** The duration is estimated from the size (an MP3 without a Xing or VBRI header). */
  readonly estimated: boolean;
}

/** The limits audio is checked against. */
export interface AudioLimits {
  /** Clips per request; 0 takes none. */
  readonly maxAudioClips: number;
  /** Decoded bytes per clip. */
  readonly maxAudioBytes: number;
  /** Milliseconds of audio per request, all clips together. */
  readonly maxAudioMs: number;
}

/** The outcome of checking a request's `audio`. */
export type AudioOutcome =
  | { readonly ok: true; readonly audio: readonly AudioInput[] }
  | { readonly ok: false; readonly message: string };

/** The media type a clip is sent under, by format. */
export const AUDIO_MEDIA_TYPES: Readonly<Record<AudioKind, string>> = {
  wav: "audio/wav",
  mp3: "audio/mpeg",
  flac: "audio/flac",
  ogg: "audio/ogg",
};

/** Media types a data URL may claim for each format (the parameters after `;` aside). */
const CLAIMS: Readonly<Record<string, AudioKind>> = {
  "audio/wav": "wav",
  "audio/x-wav": "wav",
  "audio/wave": "wav",
  "audio/vnd.wave": "wav",
  "audio/mpeg": "mp3",
  "audio/mp3": "mp3",
  "audio/mpeg3": "mp3",
  "audio/x-mp3": "mp3",
  "audio/x-mpeg": "mp3",
  "audio/flac": "flac",
  "audio/x-flac": "flac",
  "audio/ogg": "ogg",
  "audio/opus": "ogg",
  "audio/vorbis": "ogg",
  "application/ogg": "ogg",
};

/** Claims that say nothing of the format: taken for whatever the bytes are. */
const UNSAID = new Set(["", "application/octet-stream", "audio/*", "audio"]);

/** How to make each refused format one the engine decodes. */
const CONVERSIONS: Readonly<Record<string, string>> = {
  "WebM (Matroska)": "ffmpeg -i clip.webm -c:a copy clip.ogg (Opus in WebM goes into Ogg as is)",
  "MP4/M4A": "ffmpeg -i clip.m4a clip.mp3",
  "AAC (ADTS)": "ffmpeg -i clip.aac clip.mp3",
};

/**
 * The payload size `--max-audio-clips` clips of `--max-audio-bytes` each take
 * as base64 data URLs (the text beside them is counted with the images').
 */
export function payloadRoomForAudio(maxClips: number, maxBytes: number): number {
  return base64Room(maxClips, maxBytes);
}

/** Seconds for people: `0.85 s`, `42.3 s`. */
export function formatSeconds(seconds: number): string {
  return `${seconds < 10 ? seconds.toFixed(2) : seconds.toFixed(1)} s`;
}

/**
 * Checks a request's `audio` field (undefined or null: none).
 *
 * @returns the clips to send on, or a message naming the first bad clip's
 * index and why it was refused.
 */
export function parseAudio(value: unknown, limits: AudioLimits): AudioOutcome {
  if (value === undefined || value === null) return { ok: true, audio: [] };
  const fail = (message: string): AudioOutcome => ({ ok: false, message });
  if (!Array.isArray(value)) {
    return fail("'audio' must be a list of data:audio/...;base64 URLs or base64 strings");
  }
  if (value.length === 0) return { ok: true, audio: [] };
  if (limits.maxAudioClips === 0) {
    return fail("'audio': this service takes no audio (--max-audio-clips is 0)");
  }
  if (value.length > limits.maxAudioClips) {
    return fail(
      `'audio' holds ${value.length} clips, more than the limit of ${limits.maxAudioClips} per request`,
    );
  }
  const audio: AudioInput[] = [];
  let seconds = 0;
  for (const [index, item] of value.entries()) {
    const checked = checkClip(item, limits);
    if (typeof checked === "string") return fail(`'audio[${index}]' ${checked}`);
    audio.push(checked);
    seconds += checked.seconds;
  }
  const limit = limits.maxAudioMs / 1000;
  if (seconds > limit) {
    const what = audio.length === 1 ? `'audio[0]' lasts` : `'audio' lasts`;
    const together = audio.length === 1 ? "" : " together";
    const estimated = audio.some((clip) => clip.estimated)
      ? " (estimated from an MP3's bitrate: it has no Xing or VBRI header)"
      : "";
    return fail(
      `${what} ${formatSeconds(seconds)}${together}${estimated}, more than the limit of ${
        formatSeconds(limit)
      } (--max-audio-duration)`,
    );
  }
  return { ok: true, audio };
}

/** One clip checked: the clip, or why it is refused (after its name). */
function checkClip(item: unknown, limits: AudioLimits): AudioInput | string {
  if (typeof item !== "string") {
    return "must be a string: a data:audio/...;base64 URL or base64";
  }
  let base64 = item;
  let claim: string | undefined;
  let params: string[] = [];
  const dataUrl = DATA_URL.exec(item);
  if (dataUrl) {
    let type: string;
    [type, ...params] = dataUrl[1].split(";");
    if (params.at(-1)?.toLowerCase() !== "base64") {
      return "is a data: URL without ;base64 (only base64 data URLs are taken)";
    }
    claim = type.trim().toLowerCase();
    base64 = item.slice(dataUrl[0].length);
  } else if (OTHER_URL.test(item)) {
    return "is neither a data:audio/...;base64 URL nor base64 (send the clip itself, not its address)";
  }
  // Padded: vLLM's audio loader refuses base64 without its padding ("Incorrect padding").
  const decoded = decodeBase64(base64, limits.maxAudioBytes, "--max-audio-bytes");
  if (typeof decoded === "string") return decoded;
  base64 = decoded.base64;
  const bytes = decoded.bytes;
  const sniffed = sniffAudio(bytes);
  if (sniffed === undefined) {
    return `is not a WAV, MP3, FLAC or Ogg clip (its first bytes are ${firstBytes(bytes)})`;
  }
  if ("other" in sniffed) {
    const how = CONVERSIONS[sniffed.other];
    return `is ${
      article(sniffed.other)
    } ${sniffed.other} file, which the engine does not decode: ` +
      `send WAV, MP3, FLAC or Ogg (Opus or Vorbis)${how ? `, e.g. ${how}` : ""}`;
  }
  const kind = sniffed.kind;
  const name = kind === "ogg" ? "Ogg" : kind.toUpperCase();
  if (claim !== undefined && !UNSAID.has(claim) && CLAIMS[claim] !== kind) {
    return `says it is ${claim} but is ${article(name)} ${name} (by its header)`;
  }
  const header = readAudioHeader(bytes);
  if (!header) return `is ${article(name)} ${name} whose header is damaged or cut short`;
  if (!DECODED_CODECS.has(header.codec)) {
    return `is ${
      article(name)
    } ${name} holding ${header.codec}, which the engine does not decode: ` +
      (kind === "ogg" ? "send Opus or Vorbis in Ogg" : "send PCM, float, A-law or µ-law WAV");
  }
  // Sent as given only when it is `data:{type};base64,...` of the right type: vLLM reads what
  // follows the first ';' as the encoding, so `;codecs=opus;base64` would fail there.
  const url = claim !== undefined && CLAIMS[claim] === kind && params.length === 1 &&
      base64.length === item.length - dataUrl![0].length
    ? item
    : `data:${AUDIO_MEDIA_TYPES[kind]};base64,${base64}`;
  return clip(url, header, bytes.length);
}

const clip = (url: string, header: AudioHeader, bytes: number): AudioInput => ({
  url,
  kind: header.kind,
  codec: header.codec,
  bytes,
  seconds: header.seconds,
  estimated: header.estimated,
});

/** "an MP3", "an Ogg", "a WAV", "a FLAC": by how the name is said. */
const article = (name: string) => /^(?:MP|Ogg|AAC|AMR|AIFF|RF64)/.test(name) ? "an" : "a";

/** One clip in words: `wav 0.85 s, 13.6 KB`; `mp3 ~0.94 s, 2.8 KB` when estimated. */
export function describeAudio(
  clip: Pick<AudioInput, "kind" | "seconds" | "estimated" | "bytes">,
): string {
  return `${clip.kind} ${clip.estimated ? "~" : ""}${formatSeconds(clip.seconds)}, ${
    byteSize(clip.bytes)
  }`;
}

/**
 * The marker a stored user turn keeps in place of its audio:
 * `[1 audio clip attached: wav 0.85 s, 13.6 KB]`.
 */
export function audioMarker(audio: readonly AudioInput[]): string {
  const what = audio.map(describeAudio).join("; ");
  return `[${audio.length} audio clip${audio.length === 1 ? "" : "s"} attached: ${what}]`;
}

/** The user's text as stored: the text, then the marker of the audio that came with it. */
export function withAudioMarker(text: string, audio: readonly AudioInput[] | undefined): string {
  if (!audio || audio.length === 0) return text;
  return text === "" ? audioMarker(audio) : `${text}\n${audioMarker(audio)}`;
}

/**
 * Audio tokens a second: Qwen2-Audio and Qwen2.5-Omni pool Whisper's 50
 * frames a second by 2 (30 s → 750 tokens); Ultravox stacks 8 (6.25 a second).
 */
const TOKENS_PER_SECOND = 25;
/** Tokens around each clip (audio start and end). */
const AUDIO_MARKER_TOKENS = 2;
/** The most tokens a second any served model makes: Whisper's frames, unpooled. */
const MAX_TOKENS_PER_SECOND = 50;

/** Roughly the prompt tokens vLLM reports for a clip of `seconds` (Qwen2-Audio's count). */
export function audioTokens(seconds: number): number {
  return Math.ceil(seconds * TOKENS_PER_SECOND) + AUDIO_MARKER_TOKENS;
}

/** The most prompt tokens a model may count for a clip of `seconds` (estimated: twice as long). */
export function audioTokenBound(seconds: number, estimated: boolean): number {
  return Math.ceil((estimated ? 2 : 1) * seconds * MAX_TOKENS_PER_SECOND) + 64;
}

/** Roughly the prompt tokens of checked clips, together (see {@linkcode audioTokens}). */
export function audioClipsTokens(audio: readonly AudioInput[] | undefined): number {
  let tokens = 0;
  for (const clip of audio ?? []) tokens += audioTokens(clip.seconds);
  return tokens;
}
