/**
 * What an audio clip's bytes say, read from its headers without decoding a
 * sample: its format by magic number (WAV, MP3, FLAC, Ogg), its codec, sample
 * rate, channels and duration, and, for formats the engine cannot decode
 * (WebM, MP4/M4A, raw AAC...), what they are, so that a refusal can name them.
 *
 * Duration, by format: WAV, the data chunk's size over the byte rate; FLAC,
 * STREAMINFO's total samples over the sample rate; Ogg, the granule position
 * of the last page (Opus counts at 48 kHz, less the pre-skip; Vorbis at its
 * sample rate); MP3, the frame count of a Xing/Info or VBRI header, and
 * without one the size over the first frame's bitrate, marked estimated (a
 * variable-bitrate file without such a header is as long as its frames, which
 * only decoding counts).
 *
 * @module
 */

/** The audio formats taken (what vLLM's loader, libsndfile through librosa, decodes). */
export type AudioKind = "wav" | "mp3" | "flac" | "ogg";

/** A clip's format and length, as its headers give them. */
export interface AudioHeader {
  readonly kind: AudioKind;
  /**
   * The codec inside: `pcm`, `float`, `alaw`, `ulaw` (WAV), `mp3`, `flac`,
   * `opus`, `vorbis`; anything else in a WAV or Ogg is named here too
   * (`codec 0x0055`, `speex`) and refused by the caller.
   */
  readonly codec: string;
  readonly sampleRate: number;
  readonly channels: number;
  readonly seconds: number;
  /** The duration is estimated from the size (an MP3 without a Xing or VBRI header). */
  readonly estimated: boolean;
}

/** What a clip's first bytes are: one of the formats taken, another format by name, or unknown. */
export type AudioSniff =
  | { readonly kind: AudioKind }
  | { readonly other: string }
  | undefined;

/** The codecs of the formats taken that the engine decodes. */
export const DECODED_CODECS: ReadonlySet<string> = new Set([
  "pcm",
  "float",
  "alaw",
  "ulaw",
  "mp3",
  "flac",
  "opus",
  "vorbis",
]);

const ascii = (text: string) => [...text].map((c) => c.charCodeAt(0));

const startsWith = (bytes: Uint8Array, prefix: readonly number[], at = 0) =>
  bytes.length >= at + prefix.length && prefix.every((byte, i) => bytes[at + i] === byte);

const view = (bytes: Uint8Array) => new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);

/** The format `bytes` start with, by magic number. */
export function sniffAudio(bytes: Uint8Array): AudioSniff {
  if (startsWith(bytes, ascii("RIFF")) && startsWith(bytes, ascii("WAVE"), 8)) {
    return { kind: "wav" };
  }
  if (startsWith(bytes, ascii("fLaC"))) return { kind: "flac" };
  if (startsWith(bytes, ascii("OggS"))) return { kind: "ogg" };
  if (startsWith(bytes, ascii("ID3"))) return { kind: "mp3" };
  const mpeg = mpegStart(bytes, 0);
  if (mpeg === "layer3") return { kind: "mp3" };
  if (mpeg) return { other: mpeg };
  if (startsWith(bytes, [0x1a, 0x45, 0xdf, 0xa3])) return { other: "WebM (Matroska)" };
  if (startsWith(bytes, ascii("ftyp"), 4)) return { other: "MP4/M4A" };
  if (startsWith(bytes, ascii("#!AMR"))) return { other: "AMR" };
  if (startsWith(bytes, ascii("FORM")) && startsWith(bytes, ascii("AIF"), 8)) {
    return { other: "AIFF" };
  }
  if (startsWith(bytes, ascii("caff"))) return { other: "CAF" };
  if (startsWith(bytes, ascii("RF64"))) return { other: "RF64 (64-bit WAV)" };
  if (startsWith(bytes, ascii("RIFF"))) return { other: "RIFF file that is not WAVE" };
  return undefined;
}

/**
 * The format, codec and length of the clip in `bytes`; undefined when it is
 * not one of the formats taken, or its header is damaged or cut short.
 */
export function readAudioHeader(bytes: Uint8Array): AudioHeader | undefined {
  const sniffed = sniffAudio(bytes);
  if (!sniffed || !("kind" in sniffed)) return undefined;
  const header = sniffed.kind === "wav"
    ? wavHeader(bytes)
    : sniffed.kind === "flac"
    ? flacHeader(bytes)
    : sniffed.kind === "ogg"
    ? oggHeader(bytes)
    : mp3Header(bytes);
  if (
    !header || !(header.sampleRate > 0) || !(header.channels > 0) ||
    !Number.isFinite(header.seconds) || header.seconds < 0
  ) {
    return undefined;
  }
  return header;
}

// ---------------------------------------------------------------------------------------------
// WAV

const WAV_CODECS: Readonly<Record<number, string>> = { 1: "pcm", 3: "float", 6: "alaw", 7: "ulaw" };

/** RIFF chunks after "RIFF size WAVE": `fmt ` (codec, channels, rates), then `data`. */
function wavHeader(bytes: Uint8Array): AudioHeader | undefined {
  const data = view(bytes);
  let format: { codec: string; channels: number; sampleRate: number; byteRate: number } | undefined;
  let at = 12;
  while (at + 8 <= bytes.length) {
    const id = String.fromCharCode(...bytes.subarray(at, at + 4));
    const size = data.getUint32(at + 4, true);
    const body = at + 8;
    if (id === "fmt ") {
      if (size < 16 || body + 16 > bytes.length) return undefined;
      let tag = data.getUint16(body, true);
      // WAVE_FORMAT_EXTENSIBLE: the codec is the first two bytes of the sub-format GUID.
      if (tag === 0xfffe && size >= 40 && body + 26 <= bytes.length) {
        tag = data.getUint16(body + 24, true);
      }
      format = {
        codec: WAV_CODECS[tag] ?? `codec 0x${tag.toString(16).padStart(4, "0")}`,
        channels: data.getUint16(body + 2, true),
        sampleRate: data.getUint32(body + 4, true),
        byteRate: data.getUint32(body + 8, true),
      };
    } else if (id === "data") {
      if (!format || format.byteRate === 0) return undefined;
      const available = bytes.length - body;
      // A writer that streamed the file may leave the size 0 or all ones; a cut file holds less
      // than it says. Either way the decoder reads what is there.
      const declared = size === 0 || size === 0xffffffff ? available : size;
      return {
        kind: "wav",
        codec: format.codec,
        sampleRate: format.sampleRate,
        channels: format.channels,
        seconds: Math.min(declared, available) / format.byteRate,
        estimated: false,
      };
    }
    at = body + size + (size & 1);
  }
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// FLAC

/** Compressed size over raw size assumed for a FLAC whose STREAMINFO gives no length. */
const FLAC_TYPICAL_RATIO = 0.6;

/** STREAMINFO is the first metadata block: 20-bit rate, channels, bits, 36-bit total samples. */
function flacHeader(bytes: Uint8Array): AudioHeader | undefined {
  if (bytes.length < 8 + 34 || (bytes[4] & 0x7f) !== 0) return undefined;
  const length = (bytes[5] << 16) | (bytes[6] << 8) | bytes[7];
  if (length < 34) return undefined;
  const b = (i: number) => bytes[8 + i];
  const sampleRate = (b(10) << 12) | (b(11) << 4) | (b(12) >> 4);
  const channels = ((b(12) >> 1) & 0x07) + 1;
  const bitsPerSample = (((b(12) & 1) << 4) | (b(13) >> 4)) + 1;
  const totalSamples = (b(13) & 0x0f) * 2 ** 32 + view(bytes).getUint32(8 + 14);
  if (sampleRate === 0) return undefined;
  if (totalSamples > 0) {
    return {
      kind: "flac",
      codec: "flac",
      sampleRate,
      channels,
      seconds: totalSamples / sampleRate,
      estimated: false,
    };
  }
  // An encoder writing to a pipe cannot go back to fill the count in.
  const rawBytesPerSecond = sampleRate * channels * bitsPerSample / 8;
  return {
    kind: "flac",
    codec: "flac",
    sampleRate,
    channels,
    seconds: bytes.length / FLAC_TYPICAL_RATIO / rawBytesPerSecond,
    estimated: true,
  };
}

// ---------------------------------------------------------------------------------------------
// Ogg

const OGG_CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n << 24;
  for (let k = 0; k < 8; k++) c = c & 0x80000000 ? (c << 1) ^ 0x04c11db7 : c << 1;
  return c >>> 0;
});

/** The most bytes an Ogg page takes: its header with 255 segments of 255 bytes. */
const MAX_OGG_PAGE = 27 + 255 + 255 * 255;
/**
 * How far from the end the last page with a granule position is looked for
 * (a packet spanning pages leaves a few without one), and how many candidate
 * pages there have their checksum computed: a clip forged full of page
 * headers costs a bounded few checksums, not one per byte.
 */
const OGG_TAIL_BYTES = 4 * MAX_OGG_PAGE;
const OGG_TAIL_CHECKSUMS = 16;

/** An Ogg page at `at`: its granule position, serial number and length, when whole and sound. */
function oggPage(
  bytes: Uint8Array,
  at: number,
  serial?: number,
): { granule: bigint; serial: number; length: number; dataAt: number } | undefined {
  if (!startsWith(bytes, ascii("OggS"), at) || bytes[at + 4] !== 0 || at + 27 > bytes.length) {
    return undefined;
  }
  const data = view(bytes);
  if (serial !== undefined && data.getUint32(at + 14, true) !== serial) return undefined;
  const segments = bytes[at + 26];
  if (at + 27 + segments > bytes.length) return undefined;
  let body = 0;
  for (let i = 0; i < segments; i++) body += bytes[at + 27 + i];
  const length = 27 + segments + body;
  if (at + length > bytes.length) return undefined;
  // The checksum covers the page with its own field read as zero.
  let crc = 0;
  for (let i = 0; i < length; i++) {
    const byte = i >= 22 && i < 26 ? 0 : bytes[at + i];
    crc = ((crc << 8) ^ OGG_CRC_TABLE[((crc >>> 24) ^ byte) & 0xff]) >>> 0;
  }
  if (crc !== data.getUint32(at + 22, true)) return undefined;
  return {
    granule: data.getBigInt64(at + 6, true),
    serial: data.getUint32(at + 14, true),
    length,
    dataAt: at + 27 + segments,
  };
}

/**
 * The first page's first packet names the codec (OpusHead, or Vorbis's
 * identification header); the last page of the same stream with a granule
 * position ends it.
 */
function oggHeader(bytes: Uint8Array): AudioHeader | undefined {
  const first = oggPage(bytes, 0);
  if (!first) return undefined;
  const data = view(bytes);
  const at = first.dataAt;
  let codec: string;
  let sampleRate: number;
  let channels: number;
  let preSkip = 0;
  let granuleRate: number;
  if (startsWith(bytes, ascii("OpusHead"), at) && at + 19 <= bytes.length) {
    codec = "opus";
    channels = bytes[at + 9];
    preSkip = data.getUint16(at + 10, true);
    // The rate the input had; Opus itself always runs, and counts granules, at 48 kHz.
    sampleRate = data.getUint32(at + 12, true) || 48_000;
    granuleRate = 48_000;
  } else if (startsWith(bytes, [0x01, ...ascii("vorbis")], at) && at + 16 <= bytes.length) {
    codec = "vorbis";
    channels = bytes[at + 11];
    sampleRate = data.getUint32(at + 12, true);
    granuleRate = sampleRate;
  } else {
    const name = startsWith(bytes, ascii("Speex"), at)
      ? "speex"
      : startsWith(bytes, [0x7f, ...ascii("FLAC")], at)
      ? "ogg flac"
      : startsWith(bytes, [0x80, ...ascii("theora")], at)
      ? "theora video"
      : "an unknown codec";
    return { kind: "ogg", codec: name, sampleRate: 1, channels: 1, seconds: 0, estimated: false };
  }
  if (granuleRate === 0) return undefined;
  // The last sound page of this stream with a granule position (-1: no packet ends there).
  const from = Math.max(first.length, bytes.length - OGG_TAIL_BYTES);
  let checksums = 0;
  for (let end = bytes.length - 27; end >= from && checksums < OGG_TAIL_CHECKSUMS; end--) {
    if (bytes[end] !== 0x4f || bytes[end + 1] !== 0x67) continue;
    if (view(bytes).getBigInt64(end + 6, true) < 0n) continue;
    checksums++;
    const page = oggPage(bytes, end, first.serial);
    if (!page) continue;
    const samples = Number(page.granule) - preSkip;
    return {
      kind: "ogg",
      codec,
      sampleRate,
      channels,
      seconds: Math.max(0, samples) / granuleRate,
      estimated: false,
    };
  }
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// MP3

const MPEG1_LAYER3_KBPS = [0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320];
const MPEG2_LAYER3_KBPS = [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160];
const SAMPLE_RATES: Readonly<Record<number, readonly number[]>> = {
  3: [44_100, 48_000, 32_000], // MPEG-1
  2: [22_050, 24_000, 16_000], // MPEG-2
  0: [11_025, 12_000, 8_000], // MPEG-2.5
};

interface MpegFrame {
  readonly version: number;
  readonly sampleRate: number;
  readonly kbps: number;
  readonly mono: boolean;
  readonly length: number;
  readonly samples: number;
}

/** The MPEG audio Layer III frame header at `at`, when it is one with a usable bitrate. */
function mpegFrame(bytes: Uint8Array, at: number): MpegFrame | undefined {
  if (at + 4 > bytes.length || bytes[at] !== 0xff || (bytes[at + 1] & 0xe0) !== 0xe0) {
    return undefined;
  }
  const version = (bytes[at + 1] >> 3) & 0x03;
  const layer = (bytes[at + 1] >> 1) & 0x03;
  const bitrateIndex = bytes[at + 2] >> 4;
  const rateIndex = (bytes[at + 2] >> 2) & 0x03;
  if (version === 1 || layer !== 1 || rateIndex === 3) return undefined;
  // Free-format (0) and the forbidden index (15) give no frame length.
  if (bitrateIndex === 0 || bitrateIndex === 15) return undefined;
  const mpeg1 = version === 3;
  const kbps = (mpeg1 ? MPEG1_LAYER3_KBPS : MPEG2_LAYER3_KBPS)[bitrateIndex];
  const sampleRate = SAMPLE_RATES[version][rateIndex];
  const padding = (bytes[at + 2] >> 1) & 0x01;
  return {
    version,
    sampleRate,
    kbps,
    mono: bytes[at + 3] >> 6 === 3,
    length: Math.floor((mpeg1 ? 144_000 : 72_000) * kbps / sampleRate) + padding,
    samples: mpeg1 ? 1152 : 576,
  };
}

/**
 * Whether an MPEG audio stream starts at `at`: `layer3` when a Layer III
 * frame does and the next frame (or the end) follows where its length says;
 * a name for Layer I/II or ADTS AAC, which share the sync word; undefined
 * otherwise.
 */
function mpegStart(bytes: Uint8Array, at: number): "layer3" | string | undefined {
  if (at + 4 > bytes.length || bytes[at] !== 0xff || (bytes[at + 1] & 0xe0) !== 0xe0) {
    return undefined;
  }
  const layer = (bytes[at + 1] >> 1) & 0x03;
  if ((bytes[at + 1] & 0xf6) === 0xf0) return "AAC (ADTS)";
  if (layer === 2 || layer === 3) return `MPEG Layer ${layer === 2 ? "II" : "I"} audio`;
  const frame = mpegFrame(bytes, at);
  if (!frame) return undefined;
  const next = at + frame.length;
  if (next >= bytes.length || startsWith(bytes, ascii("TAG"), next)) return "layer3";
  const following = mpegFrame(bytes, next);
  return following && following.version === frame.version &&
      following.sampleRate === frame.sampleRate
    ? "layer3"
    : undefined;
}

/** Zero bytes some taggers leave between an ID3v2 tag and the first frame, at most. */
const MAX_PADDING = 4096;

/** An ID3v2 tag skipped, the first frame's header, then its Xing/Info or VBRI frame count. */
function mp3Header(bytes: Uint8Array): AudioHeader | undefined {
  let at = 0;
  if (startsWith(bytes, ascii("ID3"))) {
    if (bytes.length < 10) return undefined;
    // A "syncsafe" size: 7 bits a byte.
    const size = (bytes[6] << 21) | (bytes[7] << 14) | (bytes[8] << 7) | bytes[9];
    at = 10 + size + (bytes[5] & 0x10 ? 10 : 0);
  }
  const paddingEnd = Math.min(bytes.length, at + MAX_PADDING);
  while (at < paddingEnd && bytes[at] === 0) at++;
  if (mpegStart(bytes, at) !== "layer3") return undefined;
  const frame = mpegFrame(bytes, at)!;
  const data = view(bytes);
  const base = {
    kind: "mp3" as const,
    codec: "mp3",
    sampleRate: frame.sampleRate,
    channels: frame.mono ? 1 : 2,
  };
  // Xing (VBR) or Info (CBR) sits after the side information; its flag 1 says a frame count follows.
  const sideInfo = frame.version === 3 ? (frame.mono ? 17 : 32) : (frame.mono ? 9 : 17);
  const xing = at + 4 + sideInfo;
  if (
    (startsWith(bytes, ascii("Xing"), xing) || startsWith(bytes, ascii("Info"), xing)) &&
    xing + 12 <= bytes.length && (data.getUint32(xing + 4) & 1) === 1
  ) {
    const frames = data.getUint32(xing + 8);
    return { ...base, seconds: frames * frame.samples / frame.sampleRate, estimated: false };
  }
  // VBRI (Fraunhofer's encoder) sits 32 bytes after the frame header.
  const vbri = at + 36;
  if (startsWith(bytes, ascii("VBRI"), vbri) && vbri + 18 <= bytes.length) {
    const frames = data.getUint32(vbri + 14);
    return { ...base, seconds: frames * frame.samples / frame.sampleRate, estimated: false };
  }
  let end = bytes.length;
  if (end - 128 >= at && startsWith(bytes, ascii("TAG"), end - 128)) end -= 128;
  return { ...base, seconds: (end - at) * 8 / (frame.kbps * 1000), estimated: true };
}
