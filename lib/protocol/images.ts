/**
 * Images a request carries (`images`): checked on the gateway thread before
 * anything reaches the engine, sent to it as OpenAI `image_url` content
 * parts, and remembered in the session only as a short marker.
 *
 * Each image is a `data:image/...;base64,...` URL or bare base64 (the
 * original's OwOGPT backend sends either). It must decode, be PNG, JPEG, WebP
 * or GIF by its magic number (whatever the URL claims: what is sent on names
 * the real type), have a readable header, and be at most `--max-image-bytes`
 * decoded; a request holds at most `--max-images`. Remote `http(s)` URLs are
 * refused unless `--remote-images` is on: the engine would fetch them, which
 * lets any client make the GPU box reach any address.
 *
 * @module
 */

import { base64Room, byteSize, DATA_URL, decodeBase64, firstBytes, OTHER_URL } from "./data_url.ts";
import { type ImageKind, readImageHeader, sniffImage } from "./image_header.ts";

/** An image as checked: what the engine is sent, and what the marker says of it. */
export interface ImageInput {
  /** A data URL naming the image's real type; or, remote images on, the URL as given. */
  readonly url: string;
  readonly kind: ImageKind | "remote";
  /** Decoded size in bytes (0 for a remote image, not fetched here). */
  readonly bytes: number;
  readonly width?: number;
  readonly height?: number;
}

/** The limits images are checked against. */
export interface ImageLimits {
  /** Images per request; 0 takes none. */
  readonly maxImages: number;
  /** Decoded bytes per image. */
  readonly maxImageBytes: number;
  /** Whether `http(s)` URLs are passed on for the engine to fetch. */
  readonly remoteImages: boolean;
}

/** Pixels a side of an image may have (vLLM's image loader refuses decompression bombs too). */
export const MAX_IMAGE_SIDE = 16_384;

/** Bytes a payload holds besides its images: the message and the other fields. */
export const TEXT_PAYLOAD_ROOM = 16 * 1024;

/**
 * The payload size `--max-images` images of `--max-image-bytes` each take as
 * base64 data URLs, with {@linkcode TEXT_PAYLOAD_ROOM} for the rest: what
 * `--max-payload-bytes` must allow.
 */
export function payloadRoomForImages(maxImages: number, maxImageBytes: number): number {
  if (maxImages === 0) return 0;
  return base64Room(maxImages, maxImageBytes) + TEXT_PAYLOAD_ROOM;
}

/** The outcome of checking a request's `images`. */
export type ImagesOutcome =
  | { readonly ok: true; readonly images: readonly ImageInput[] }
  | { readonly ok: false; readonly message: string };

const REMOTE_URL = /^https?:\/\//i;

/**
 * Checks a request's `images` field (undefined or null: none).
 *
 * @returns the images to send on, or a message naming the first bad image's
 * index and why it was refused.
 */
export function parseImages(value: unknown, limits: ImageLimits): ImagesOutcome {
  if (value === undefined || value === null) return { ok: true, images: [] };
  const fail = (message: string): ImagesOutcome => ({ ok: false, message });
  if (!Array.isArray(value)) {
    return fail("'images' must be a list of data:image/...;base64 URLs or base64 strings");
  }
  if (value.length === 0) return { ok: true, images: [] };
  if (limits.maxImages === 0) {
    return fail("'images': this service takes no images (--max-images is 0)");
  }
  if (value.length > limits.maxImages) {
    return fail(
      `'images' holds ${value.length} images, more than the limit of ${limits.maxImages} per request`,
    );
  }
  const images: ImageInput[] = [];
  for (const [index, item] of value.entries()) {
    const checked = checkImage(item, limits);
    if (typeof checked === "string") return fail(`'images[${index}]' ${checked}`);
    images.push(checked);
  }
  return { ok: true, images };
}

/** One image checked: the image, or why it is refused (after its name). */
function checkImage(item: unknown, limits: ImageLimits): ImageInput | string {
  if (typeof item !== "string") {
    return "must be a string: a data:image/...;base64 URL or base64";
  }
  if (REMOTE_URL.test(item)) {
    if (!limits.remoteImages) {
      return "is a remote URL, and remote images are off here (the engine would fetch it): " +
        "send the image itself, as a data:image/...;base64 URL or base64";
    }
    if (item.length > 2048 || !URL.canParse(item)) return "is not a valid http(s) URL";
    return { url: item, kind: "remote", bytes: 0 };
  }
  let base64 = item;
  const dataUrl = DATA_URL.exec(item);
  if (dataUrl) {
    if (!/;base64$/i.test(dataUrl[1])) {
      return "is a data: URL without ;base64 (only base64 data URLs are taken)";
    }
    base64 = item.slice(dataUrl[0].length);
  } else if (OTHER_URL.test(item)) {
    return "is neither a data:image/...;base64 URL nor base64";
  }
  // Padded: what was taken here is taken by vLLM too.
  const decoded = decodeBase64(base64, limits.maxImageBytes, "--max-image-bytes");
  if (typeof decoded === "string") return decoded;
  base64 = decoded.base64;
  const bytes = decoded.bytes;
  const kind = sniffImage(bytes);
  if (kind === undefined) {
    return `is not a PNG, JPEG, WebP or GIF image (its first bytes are ${firstBytes(bytes)})`;
  }
  const header = readImageHeader(bytes);
  if (!header) return `is a ${kind.toUpperCase()} whose header is damaged or cut short`;
  if (header.width > MAX_IMAGE_SIDE || header.height > MAX_IMAGE_SIDE) {
    return `is ${header.width}×${header.height} pixels, more than ${MAX_IMAGE_SIDE} a side`;
  }
  const claimed = dataUrl ? /^data:image\/([a-z]+)/i.exec(item)?.[1]?.toLowerCase() : undefined;
  const sameType = claimed === kind || (claimed === "jpg" && kind === "jpeg");
  const url = sameType && base64.length === item.length - dataUrl![0].length
    ? item
    : `data:image/${kind};base64,${base64}`;
  return { url, kind, bytes: bytes.length, width: header.width, height: header.height };
}

/** One image in words: `png 64×48, 1.2 KB`, or `remote image (example.com)`. */
export function describeImage(image: ImageInput): string {
  if (image.kind === "remote") return `remote image (${new URL(image.url).host})`;
  return `${image.kind} ${image.width}×${image.height}, ${byteSize(image.bytes)}`;
}

/**
 * The marker a stored user turn keeps in place of its images:
 * `[1 image attached: png 64×48, 1.2 KB]`.
 */
export function imageMarker(images: readonly ImageInput[]): string {
  const what = images.length === 1
    ? describeImage(images[0])
    : images.map((image) => `${describeImage(image)}`).join("; ");
  return `[${images.length} image${images.length === 1 ? "" : "s"} attached: ${what}]`;
}

/** The user's text as stored: the text, then the marker of the images that came with it. */
export function withImageMarker(text: string, images: readonly ImageInput[] | undefined): string {
  if (!images || images.length === 0) return text;
  return text === "" ? imageMarker(images) : `${text}\n${imageMarker(images)}`;
}

/** Qwen2-VL/2.5-VL: one token per 28×28 pixels once the image is resized to those steps. */
const PATCH = 28;
const MIN_PIXELS = 56 * 56;
const MAX_PIXELS = 16_384 * PATCH * PATCH;
/** Tokens around each image (vision start and end). */
const IMAGE_MARKER_TOKENS = 2;
/** What an image of unknown size (a remote one) is taken to cost. */
const UNKNOWN_IMAGE_TOKENS = 1_024;

/**
 * Roughly the prompt tokens vLLM reports for an image of `width`×`height`, as
 * Qwen2.5-VL's processor makes them (the image is resized to multiples of 28
 * pixels between 56×56 and 12.8 megapixels, keeping its aspect; one token
 * per 28×28 patch, plus 2 around it): 64×48 → 6, 1280×720 → 1,196. Other
 * models count otherwise (LLaVA-1.5: 576 whatever the size; Gemma 3: 256);
 * this is an estimate, and the engine's `usage` is what is reported.
 */
export function imageTokens(width: number | undefined, height: number | undefined): number {
  if (!width || !height) return UNKNOWN_IMAGE_TOKENS;
  let h = Math.max(PATCH, Math.round(height / PATCH) * PATCH);
  let w = Math.max(PATCH, Math.round(width / PATCH) * PATCH);
  if (h * w > MAX_PIXELS) {
    const beta = Math.sqrt((height * width) / MAX_PIXELS);
    h = Math.max(PATCH, Math.floor(height / beta / PATCH) * PATCH);
    w = Math.max(PATCH, Math.floor(width / beta / PATCH) * PATCH);
  } else if (h * w < MIN_PIXELS) {
    const beta = Math.sqrt(MIN_PIXELS / (height * width));
    h = Math.ceil(height * beta / PATCH) * PATCH;
    w = Math.ceil(width * beta / PATCH) * PATCH;
  }
  return (h / PATCH) * (w / PATCH) + IMAGE_MARKER_TOKENS;
}

/**
 * The most prompt tokens any model served by vLLM may count for an image of
 * that size: Qwen2.5-VL's 16,384 at most, or a token per 16×16 pixels
 * (Pixtral-style, no merging), whichever is more. Engine `usage` above this
 * is taken for nonsense.
 */
export function imageTokenBound(width: number | undefined, height: number | undefined): number {
  const pixels = width && height ? width * height : MAX_IMAGE_SIDE * MAX_IMAGE_SIDE / 4;
  return Math.max(16_400, Math.ceil(pixels / 256) + 64);
}

/** Roughly the prompt tokens of checked images, together (see {@linkcode imageTokens}). */
export function imagesTokens(images: readonly ImageInput[] | undefined): number {
  let tokens = 0;
  for (const image of images ?? []) tokens += imageTokens(image.width, image.height);
  return tokens;
}
