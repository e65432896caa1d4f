/**
 * Images on the way to the engine: a user turn with images as OpenAI content
 * parts (text, then `image_url` parts), what such a message counts for, and
 * the engine's refusal of images (a text-only model) told apart from other
 * errors.
 *
 * @module
 */

import { type AudioPart, audioPart } from "./audio_content.ts";
import type { AudioInput } from "../protocol/audio.ts";
import { type ImageHeader, readImageHeader } from "../protocol/image_header.ts";
import { ServiceError } from "../protocol/errors.ts";
import { refusedText } from "./engine_errors.ts";
import { imageTokenBound, imageTokens } from "../protocol/images.ts";

/** An OpenAI chat content part: text, an image by URL (a data URL here), or audio. */
export type ContentPart =
  | { readonly type: "text"; readonly text: string }
  | { readonly type: "image_url"; readonly image_url: { readonly url: string } }
  | AudioPart;

/** A message's content: text, or content parts. */
export type MessageContent = string | readonly ContentPart[];

/** A user turn's content: its text alone, or the text and then one part per image and clip. */
export function userContent(
  text: string,
  imageUrls: readonly string[] | undefined,
  audio?: readonly Pick<AudioInput, "url" | "kind">[],
): MessageContent {
  if ((!imageUrls || imageUrls.length === 0) && (!audio || audio.length === 0)) return text;
  return [
    ...(text.trim() === "" ? [] : [{ type: "text" as const, text }]),
    ...(imageUrls ?? []).map((url) => ({ type: "image_url" as const, image_url: { url } })),
    ...(audio ?? []).map(audioPart),
  ];
}

/** The text of a message's content (its text parts, joined). */
export function textOf(content: unknown): string {
  if (typeof content === "string") return content;
  if (!Array.isArray(content)) {
    return content === undefined || content === null ? "" : String(content);
  }
  return content
    .filter((part) => part?.type === "text" && typeof part.text === "string")
    .map((part) => part.text as string)
    .join("\n");
}

/** The image URLs of a message's content parts. */
function imageUrlsOf(content: unknown): string[] {
  if (!Array.isArray(content)) return [];
  return content
    .filter((part) => part?.type === "image_url" && typeof part.image_url?.url === "string")
    .map((part) => part.image_url.url as string);
}

/** Base64 characters decoded first to find a header (a JPEG's EXIF segment may be 64 KiB). */
const HEADER_PREFIX_CHARS = 88_000;

/**
 * The header of the image in a base64 data URL, read from its first bytes
 * (all of them when the header lies further in); undefined for a remote URL
 * or something unreadable.
 */
function headerOfUrl(url: string): ImageHeader | undefined {
  const comma = url.indexOf(",");
  if (!/^data:[^,]*;base64,/i.test(url) || comma === -1) return undefined;
  const base64 = url.slice(comma + 1);
  const decode = (text: string) => {
    try {
      return (Uint8Array as unknown as { fromBase64(t: string): Uint8Array }).fromBase64(text);
    } catch {
      return undefined;
    }
  };
  if (base64.length > HEADER_PREFIX_CHARS) {
    const prefix = decode(base64.slice(0, HEADER_PREFIX_CHARS));
    const header = prefix && readImageHeader(prefix);
    if (header) return header;
  }
  const bytes = decode(base64);
  return bytes && readImageHeader(bytes);
}

/** Roughly the prompt tokens of a message's images (see {@linkcode imageTokens}). */
export function imageTokensOf(content: unknown): number {
  let tokens = 0;
  for (const url of imageUrlsOf(content)) {
    const header = headerOfUrl(url);
    tokens += imageTokens(header?.width, header?.height);
  }
  return tokens;
}

/** The most prompt tokens a message's images may count for (see {@linkcode imageTokenBound}). */
export function imageTokenBoundOf(content: unknown): number {
  let tokens = 0;
  for (const url of imageUrlsOf(content)) {
    const header = headerOfUrl(url);
    tokens += imageTokenBound(header?.width, header?.height);
  }
  return tokens;
}

/**
 * How engines say they take no images: vLLM serving a text-only model ("... is
 * not a multimodal model"), llama.cpp without a projector ("image input is not
 * supported"), others ("does not support images/vision").
 */
const NO_IMAGES =
  /not a multimodal model|image input is not supported|does not support (?:image|vision|multi-?modal)|(?:image|vision|multi-?modal)[^.]{0,40}not supported|mmproj/i;

/**
 * The client's error when the engine refused a request with images because
 * the served model takes none: `invalid_request`, never retried; undefined
 * for any other error, or a request without images.
 */
export function imageRefusal(
  error: unknown,
  messages: readonly { readonly content: unknown }[],
): ServiceError | undefined {
  if (!messages.some((message) => imageUrlsOf(message.content).length > 0)) return undefined;
  const refused = refusedText(error);
  if (!refused || !NO_IMAGES.test(refused.text)) return undefined;
  return new ServiceError(
    "invalid_request",
    `the served model does not accept images; send text only (the engine answered ${refused.status}: ${refused.detail})`,
    { cause: error },
  );
}

/**
 * What the simulated engine says it saw in the last user message's images,
 * read from their headers: ` Saw 1 image: png 64×48.`; empty without images.
 */
export function seenImages(messages: readonly { role: string; content: unknown }[]): string {
  const urls = imageUrlsOf(messages.findLast((m) => m.role === "user")?.content);
  if (urls.length === 0) return "";
  const each = urls.map((url) => {
    if (/^https?:/i.test(url)) return `remote ${new URL(url).host}`;
    const header = headerOfUrl(url);
    return header ? `${header.kind} ${header.width}×${header.height}` : "unreadable";
  });
  return ` Saw ${urls.length} image${urls.length === 1 ? "" : "s"}: ${each.join(", ")}.`;
}
