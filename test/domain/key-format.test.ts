import { randomBytes } from "node:crypto";
import { describe, expect, it } from "vitest";
import { MAX_KEY_BYTES, MIN_KEY_BYTES, base58Decode, base58Encode, generateKey, hasValidChecksum, hashKey } from "../../src/domain/key-format.js";

const ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

/** The key with the character at `i` replaced by another base58 character. */
function withCharChanged(key: string, i: number): string {
  const c = key[i];
  const next = ALPHABET[(ALPHABET.indexOf(c) + 1) % ALPHABET.length];
  return key.slice(0, i) + next + key.slice(i + 1);
}

describe("base58", () => {
  it("round-trips random bytes of every key length", () => {
    for (let n = 0; n <= MAX_KEY_BYTES + 4; n++) {
      const bytes = randomBytes(n);
      expect(Buffer.from(base58Decode(base58Encode(bytes))!)).toEqual(bytes);
    }
  });

  it("keeps leading zero bytes as leading 1s", () => {
    const bytes = Uint8Array.from([0, 0, 1, 2, 3]);
    const text = base58Encode(bytes);
    expect(text.startsWith("11")).toBe(true);
    expect(base58Decode(text)).toEqual(bytes);
    expect(base58Encode(new Uint8Array(3))).toBe("111");
  });

  it("matches the Bitcoin alphabet on a known vector", () => {
    expect(base58Encode(Buffer.from("Hello World!"))).toBe("2NEpo7TZRRrLZSi2U");
    expect(Buffer.from(base58Decode("2NEpo7TZRRrLZSi2U")!).toString()).toBe("Hello World!");
  });

  it.each(["0", "O", "I", "l", "+", "/", "_", " ", "é", "\u0000"])("refuses the character %j", (c) => {
    expect(base58Decode(`abc${c}def`)).toBeNull();
  });
});

describe("generateKey", () => {
  it("is `prefix_` + base58 of the random bytes and a 4-byte checksum", () => {
    const key = generateKey("sk", 16);
    const [prefix, body] = key.plaintext.split("_");
    expect(prefix).toBe("sk");
    expect(body).toMatch(/^[1-9A-HJ-NP-Za-km-z]+$/);
    expect(base58Decode(body)!.length).toBe(16 + 4);
    expect(key.hash).toBe(hashKey(key.plaintext));
    expect(key.hash).toMatch(/^[0-9a-f]{64}$/);
    expect(key.start).toBe(key.plaintext.slice(0, 7));
  });

  it("has no separator without a prefix", () => {
    const key = generateKey("", 32);
    expect(key.plaintext).not.toContain("_");
    expect(base58Decode(key.plaintext)!.length).toBe(32 + 4);
    expect(key.start).toBe(key.plaintext.slice(0, 4));
  });

  it("never repeats", () => {
    const seen = new Set(Array.from({ length: 1000 }, () => generateKey("k", MIN_KEY_BYTES).plaintext));
    expect(seen.size).toBe(1000);
  });
});

describe("hasValidChecksum", () => {
  it.each([
    ["a prefixed key", "sk", 16],
    ["a key without prefix", "", 16],
    ["a long key", "live", MAX_KEY_BYTES],
  ])("accepts %s", (_what, prefix, bytes) => {
    expect(hasValidChecksum(generateKey(prefix, bytes).plaintext)).toBe(true);
  });

  it("rejects a one-character change anywhere in the body", () => {
    const key = generateKey("sk", 16).plaintext;
    for (let i = "sk_".length; i < key.length; i++) {
      expect(hasValidChecksum(withCharChanged(key, i)), `change at ${i}`).toBe(false);
    }
  });

  it("rejects a dropped, an added and a swapped character", () => {
    const key = generateKey("sk", 16).plaintext;
    expect(hasValidChecksum(key.slice(0, -1))).toBe(false);
    expect(hasValidChecksum(key + "2")).toBe(false);
    const i = key.length - 2;
    const swapped = key.slice(0, i) + key[i + 1] + key[i];
    if (swapped !== key) expect(hasValidChecksum(swapped)).toBe(false);
  });

  it.each([
    ["empty", ""],
    ["only a prefix", "sk_"],
    ["not base58", "sk_0OIl0OIl0OIl0OIl0OIl0OIl"],
    ["too short", `sk_${base58Encode(randomBytes(8))}`],
    ["too long", `sk_${"2".repeat(600)}`],
    ["an operator object", '{"$gt": ""}'],
  ])("rejects %s", (_what, key) => {
    expect(hasValidChecksum(key)).toBe(false);
  });

  it("rejects random bytes of a valid length without the checksum", () => {
    let accepted = 0;
    for (let i = 0; i < 200; i++) if (hasValidChecksum(`sk_${base58Encode(randomBytes(20))}`)) accepted++;
    expect(accepted).toBe(0);
  });
});
