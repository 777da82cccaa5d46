import crypto, { createHash, randomBytes } from "node:crypto";

const ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
const INDEX = new Int8Array(128).fill(-1);
for (let i = 0; i < ALPHABET.length; i++) INDEX[ALPHABET.charCodeAt(i)] = i;

const CHECKSUM_BYTES = 4;
export const MIN_KEY_BYTES = 16;
export const MAX_KEY_BYTES = 64;
/** Characters of the body shown in `start`. */
const START_CHARS = 4;

export function base58Encode(buf: Uint8Array): string {
  let zeros = 0;
  while (zeros < buf.length && buf[zeros] === 0) zeros++;
  let n = 0n;
  for (const b of buf) n = (n << 8n) | BigInt(b);
  let out = "";
  while (n > 0n) {
    out = ALPHABET[Number(n % 58n)] + out;
    n /= 58n;
  }
  return "1".repeat(zeros) + out;
}

export function base58Decode(s: string): Uint8Array | null {
  // Byte-array arithmetic (no BigInt): this runs on every verification.
  const bytes = new Uint8Array(Math.ceil((s.length * 733) / 1000) + 1); // log(58)/log(256)
  let length = 0;
  let zeros = 0;
  while (zeros < s.length && s.charCodeAt(zeros) === 49 /* "1" */) zeros++;
  for (let i = zeros; i < s.length; i++) {
    const c = s.charCodeAt(i);
    let carry = c < 128 ? INDEX[c] : -1;
    if (carry < 0) return null;
    let j = 0;
    for (let k = bytes.length - 1; (carry !== 0 || j < length) && k >= 0; k--, j++) {
      carry += 58 * bytes[k];
      bytes[k] = carry & 255;
      carry >>= 8;
    }
    length = j;
  }
  const out = new Uint8Array(zeros + length);
  out.set(bytes.subarray(bytes.length - length), zeros);
  return out;
}

/**
 * SHA-256 in one call: `crypto.hash` (Node ≥ 20.12) skips the Hash object
 * `createHash` builds, about a quarter of the cost for a key-sized input; both
 * run on every verification.
 */
const sha256: (data: string | Uint8Array, encoding?: "hex") => string | Buffer =
  typeof crypto.hash === "function"
    ? (data, encoding) => (encoding ? crypto.hash("sha256", data, encoding) : crypto.hash("sha256", data, "buffer"))
    : (data, encoding) => (encoding ? createHash("sha256").update(data).digest(encoding) : createHash("sha256").update(data).digest());

function checksum(random: Uint8Array): Buffer {
  return (sha256(random) as Buffer).subarray(0, CHECKSUM_BYTES);
}

export function hashKey(plaintext: string): string {
  return sha256(plaintext, "hex") as string;
}

export interface GeneratedKey {
  plaintext: string;
  hash: string;
  start: string;
}

/**
 * A new key: `prefix_` + base58(random bytes ‖ first 4 bytes of their SHA-256).
 * The checksum lets VerifyKey reject a mistyped or made-up key without a store lookup.
 */
export function generateKey(prefix: string, byteLength: number): GeneratedKey {
  const random = randomBytes(byteLength);
  const body = base58Encode(Buffer.concat([random, checksum(random)]));
  const plaintext = prefix ? `${prefix}_${body}` : body;
  return { plaintext, hash: hashKey(plaintext), start: plaintext.slice(0, (prefix ? prefix.length + 1 : 0) + START_CHARS) };
}

/** Longest plaintext a key can have: prefix (16) + "_" + base58 of 68 bytes (93). */
export const MAX_KEY_LENGTH = 512;

/** True when the key is well-formed and its checksum matches. Cheap; no I/O. */
export function hasValidChecksum(plaintext: string): boolean {
  if (plaintext.length === 0 || plaintext.length > MAX_KEY_LENGTH) return false;
  const sep = plaintext.lastIndexOf("_");
  const body = sep >= 0 ? plaintext.slice(sep + 1) : plaintext;
  const bytes = base58Decode(body);
  if (!bytes || bytes.length < MIN_KEY_BYTES + CHECKSUM_BYTES || bytes.length > MAX_KEY_BYTES + CHECKSUM_BYTES) return false;
  const random = bytes.subarray(0, bytes.length - CHECKSUM_BYTES);
  const sum = bytes.subarray(bytes.length - CHECKSUM_BYTES);
  return Buffer.from(sum).equals(checksum(random));
}
