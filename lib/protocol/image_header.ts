/**
 * What an image's first bytes say: its format, by magic number (PNG, JPEG,
 * WebP, GIF), and its width and height, read from the header each format
 * keeps them in (PNG's IHDR, JPEG's SOFn frame header, GIF's logical screen,
 * WebP's VP8/VP8L/VP8X chunk). Nothing is decoded beyond the header.
 *
 * @module
 */

/** The image formats taken. */
export type ImageKind = "png" | "jpeg" | "webp" | "gif";

/** An image's format and size in pixels. */
export interface ImageHeader {
  readonly kind: ImageKind;
  readonly width: number;
  readonly height: number;
}

const PNG_MAGIC = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];

const startsWith = (bytes: Uint8Array, prefix: readonly number[], at = 0) =>
  bytes.length >= at + prefix.length && prefix.every((byte, i) => bytes[at + i] === byte);

const ascii = (text: string) => [...text].map((c) => c.charCodeAt(0));

/** The format `bytes` start with, by magic number; undefined for anything else. */
export function sniffImage(bytes: Uint8Array): ImageKind | undefined {
  if (startsWith(bytes, PNG_MAGIC)) return "png";
  if (startsWith(bytes, [0xff, 0xd8, 0xff])) return "jpeg";
  if (startsWith(bytes, ascii("GIF87a")) || startsWith(bytes, ascii("GIF89a"))) return "gif";
  if (startsWith(bytes, ascii("RIFF")) && startsWith(bytes, ascii("WEBP"), 8)) return "webp";
  return undefined;
}

/**
 * The format and size of the image in `bytes`; undefined when they are not
 * one of the formats taken, or its header is cut short or damaged.
 */
export function readImageHeader(bytes: Uint8Array): ImageHeader | undefined {
  const kind = sniffImage(bytes);
  if (kind === undefined) return undefined;
  const size = kind === "png"
    ? pngSize(bytes)
    : kind === "jpeg"
    ? jpegSize(bytes)
    : kind === "gif"
    ? gifSize(bytes)
    : webpSize(bytes);
  if (!size || size.width < 1 || size.height < 1) return undefined;
  return { kind, ...size };
}

type Size = { width: number; height: number } | undefined;

const view = (bytes: Uint8Array) => new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);

/** IHDR is the first chunk: length 13, type "IHDR", then width and height, big-endian. */
function pngSize(bytes: Uint8Array): Size {
  if (bytes.length < 24 || !startsWith(bytes, ascii("IHDR"), 12)) return undefined;
  const data = view(bytes);
  return { width: data.getUint32(16), height: data.getUint32(20) };
}

/** The logical screen size after the 6-byte signature, little-endian. */
function gifSize(bytes: Uint8Array): Size {
  if (bytes.length < 10) return undefined;
  const data = view(bytes);
  return { width: data.getUint16(6, true), height: data.getUint16(8, true) };
}

/**
 * The first frame header (SOF0–SOF15 but DHT, JPG and DAC, which share the
 * range): after its length and precision, height and width, big-endian.
 * Segments before it are skipped by their lengths.
 */
function jpegSize(bytes: Uint8Array): Size {
  const data = view(bytes);
  let at = 2;
  while (at + 4 <= bytes.length) {
    if (bytes[at] !== 0xff) return undefined;
    const marker = bytes[at + 1];
    // Fill bytes before a marker.
    if (marker === 0xff) {
      at++;
      continue;
    }
    // Markers without a length: TEM, RSTn.
    if (marker === 0x01 || (marker >= 0xd0 && marker <= 0xd7)) {
      at += 2;
      continue;
    }
    // Start of scan or end of image before any frame header.
    if (marker === 0xda || marker === 0xd9) return undefined;
    const length = data.getUint16(at + 2);
    if (length < 2) return undefined;
    const isFrame = marker >= 0xc0 && marker <= 0xcf && marker !== 0xc4 && marker !== 0xc8 &&
      marker !== 0xcc;
    if (isFrame) {
      if (at + 9 > bytes.length) return undefined;
      return { height: data.getUint16(at + 5), width: data.getUint16(at + 7) };
    }
    at += 2 + length;
  }
  return undefined;
}

/** The first chunk after "RIFF size WEBP": lossy VP8, lossless VP8L, or extended VP8X. */
function webpSize(bytes: Uint8Array): Size {
  if (bytes.length < 30) return undefined;
  const data = view(bytes);
  if (startsWith(bytes, ascii("VP8 "), 12)) {
    // A key frame's start code, then 14-bit width and height.
    if (!startsWith(bytes, [0x9d, 0x01, 0x2a], 23)) return undefined;
    return { width: data.getUint16(26, true) & 0x3fff, height: data.getUint16(28, true) & 0x3fff };
  }
  if (startsWith(bytes, ascii("VP8L"), 12)) {
    if (bytes[20] !== 0x2f) return undefined;
    const bits = data.getUint32(21, true);
    return { width: (bits & 0x3fff) + 1, height: ((bits >>> 14) & 0x3fff) + 1 };
  }
  if (startsWith(bytes, ascii("VP8X"), 12)) {
    const u24 = (at: number) => bytes[at] | (bytes[at + 1] << 8) | (bytes[at + 2] << 16);
    return { width: u24(24) + 1, height: u24(27) + 1 };
  }
  return undefined;
}
