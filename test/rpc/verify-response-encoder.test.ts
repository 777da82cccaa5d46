import { create, equals, fromBinary, toBinary, type JsonObject, type JsonValue } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { describe, expect, it } from "vitest";
import { VerifyKeyResponseSchema } from "../../gen/latchkey/v1/key_service_pb.js";
import { VerificationCode } from "../../gen/latchkey/v1/usage_pb.js";
import { encodeVerifyKeyResponse } from "../../src/server/verify-response-encoder.js";

/** A small deterministic PRNG, so a failure reproduces. */
function rng(seed: number) {
  return () => {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    return seed / 0x7fffffff;
  };
}

function randomJson(r: () => number, depth: number): JsonValue {
  const k = Math.floor(r() * (depth > 3 ? 4 : 6));
  switch (k) {
    case 0:
      return null;
    case 1:
      return [0, -1, 1.5, 1e300, -(2 ** 53), r() * 1e6][Math.floor(r() * 6)];
    case 2:
      return ["", "plain", "ünïcødé ✓", "dotted.key", "$where", "🔑".repeat(3)][Math.floor(r() * 6)];
    case 3:
      return r() < 0.5;
    case 4:
      return Array.from({ length: Math.floor(r() * 4) }, () => randomJson(r, depth + 1));
    default:
      return randomObject(r, depth + 1);
  }
}

function randomObject(r: () => number, depth: number): JsonObject {
  const o: JsonObject = {};
  const n = Math.floor(r() * 5);
  for (let i = 0; i < n; i++) o[["a", "plan", "x.y", "$gt", "", "ключ"][Math.floor(r() * 6)] + i] = randomJson(r, depth);
  return o;
}

describe("hand-written VerifyKeyResponse encoder", () => {
  it("produces bytes that decode to the same message as toBinary, over 500 random responses", () => {
    const r = rng(42);
    for (let i = 0; i < 500; i++) {
      const init = {
        valid: r() < 0.5,
        code: Math.floor(r() * 8) as VerificationCode,
        keyId: r() < 0.9 ? `key_${i}` : "",
        name: r() < 0.5 ? `name ${i}` : "",
        meta: r() < 0.8 ? randomObject(r, 0) : undefined,
        expiresAt: r() < 0.3 ? timestampFromMs(Math.floor(r() * 4e12)) : undefined,
        enabled: r() < 0.7,
        creditsRemaining: r() < 0.5 ? BigInt(Math.floor(r() * 1000)) : undefined,
        permissions: Array.from({ length: Math.floor(r() * 3) }, (_, j) => `perm.${j}`),
        identity: r() < 0.6 ? { id: `id_${i}`, externalId: `ext|${i}`, meta: randomObject(r, 0) } : undefined,
        ratelimits: Array.from({ length: Math.floor(r() * 3) }, (_, j) => ({
          name: `rl${j}`,
          limit: BigInt(Math.floor(r() * 1e9)),
          remaining: BigInt(Math.floor(r() * 10)),
          resetAt: timestampFromMs(Date.now() + j),
          exceeded: r() < 0.3,
        })),
        apiId: r() < 0.9 ? "api_main" : "",
      };
      const expected = create(VerifyKeyResponseSchema, init);
      const bytes = encodeVerifyKeyResponse(init);
      const decoded = fromBinary(VerifyKeyResponseSchema, bytes);
      expect(equals(VerifyKeyResponseSchema, decoded, expected), `case ${i}`).toBe(true);
      // Fields in number order, as toBinary writes them: the same bytes.
      expect(Buffer.from(bytes).equals(Buffer.from(toBinary(VerifyKeyResponseSchema, expected))), `case ${i} bytes`).toBe(true);
      // And the reverse: what toBinary writes decodes to the same.
      expect(equals(VerifyKeyResponseSchema, fromBinary(VerifyKeyResponseSchema, toBinary(VerifyKeyResponseSchema, expected)), decoded)).toBe(true);
    }
  });

  it("writes the very bytes toBinary writes, for long and non-ASCII strings, large sub-messages and negative times", () => {
    const long = "n".repeat(200);
    const longer = "ü".repeat(9000); // 18,000 bytes: a three-byte length
    const bigMeta: JsonObject = { text: "x".repeat(300), nested: { list: [1, "zwei", null, true] } };
    const cases = [
      { keyId: "key_ünï", name: long, apiId: "api_✓", permissions: ["perm.ü", long] },
      { name: longer, identity: { id: "id_1", externalId: longer, meta: bigMeta } },
      { identity: { id: "id_2", externalId: "e", meta: bigMeta }, meta: bigMeta },
      { expiresAt: timestampFromMs(-86_400_123), enabled: true, creditsRemaining: 2n ** 62n },
      { creditsRemaining: -5n, code: VerificationCode.USAGE_EXCEEDED },
      {
        valid: true,
        code: VerificationCode.VALID,
        ratelimits: [{ name: long, limit: 2n ** 40n, remaining: 1n, resetAt: timestampFromMs(Date.now()), exceeded: false }],
      },
    ];
    for (const [i, init] of cases.entries()) {
      const expected = toBinary(VerifyKeyResponseSchema, create(VerifyKeyResponseSchema, init));
      expect(Buffer.from(encodeVerifyKeyResponse(init)).equals(Buffer.from(expected)), `case ${i}`).toBe(true);
    }
  });

  it("writes a credits balance of zero (the field has presence)", () => {
    const decoded = fromBinary(VerifyKeyResponseSchema, encodeVerifyKeyResponse({ code: VerificationCode.USAGE_EXCEEDED, creditsRemaining: 0n }));
    expect(decoded.creditsRemaining).toBe(0n);
  });

  it("re-encodes a meta object that was changed in place only when it is a new object", () => {
    const meta: JsonObject = { plan: "free" };
    const first = fromBinary(VerifyKeyResponseSchema, encodeVerifyKeyResponse({ meta }));
    const second = fromBinary(VerifyKeyResponseSchema, encodeVerifyKeyResponse({ meta: { ...meta, plan: "pro" } }));
    expect(first.meta).toEqual({ plan: "free" });
    expect(second.meta).toEqual({ plan: "pro" });
  });

  it("writes a key's fixed fields once and again whenever one of them changes, the per-call fields every time", () => {
    const same = (init: Parameters<typeof encodeVerifyKeyResponse>[0], what: string) => {
      const bytes = encodeVerifyKeyResponse(init);
      expect(Buffer.from(bytes).equals(Buffer.from(toBinary(VerifyKeyResponseSchema, create(VerifyKeyResponseSchema, init)))), what).toBe(true);
    };
    const permissions = ["read", "write"];
    const base = {
      valid: true,
      code: VerificationCode.VALID,
      keyId: "key_fixed_1",
      name: "first",
      apiId: "api_1",
      meta: { plan: "free" } as JsonObject,
      enabled: true,
      expiresAt: timestampFromMs(Date.UTC(2030, 0, 1)),
      permissions,
      identity: { id: "id_1", externalId: "ext_1", meta: { tier: 1 } as JsonObject },
      ratelimits: [{ name: "requests", limit: 10n, remaining: 9n, resetAt: timestampFromMs(1_000), exceeded: false }],
      creditsRemaining: 5n,
    };
    same(base, "first call");
    // Per-call fields change, the fixed ones are reused.
    same({ ...base, valid: false, code: VerificationCode.RATE_LIMITED, creditsRemaining: 0n, ratelimits: [{ ...base.ratelimits[0], remaining: 0n, exceeded: true }] }, "per-call fields");
    same({ ...base, creditsRemaining: undefined, ratelimits: [] }, "no credits, no limits");
    // Each fixed field changed on its own is written anew.
    same({ ...base, name: "renamed" }, "name");
    same({ ...base, name: "renamed", apiId: "api_2" }, "api id");
    same({ ...base, name: "renamed", meta: { plan: "pro" } }, "meta (a new object)");
    same({ ...base, name: "renamed", enabled: false }, "enabled");
    same({ ...base, name: "renamed", expiresAt: undefined }, "no expiry");
    same({ ...base, name: "renamed", expiresAt: timestampFromMs(Date.UTC(2031, 0, 1)) }, "expiry");
    permissions.push("admin");
    same({ ...base, name: "renamed" }, "a permission added to the same array");
    same({ ...base, name: "renamed", identity: undefined }, "identity removed");
    same({ ...base, name: "renamed", identity: { ...base.identity, externalId: "ext_2" } }, "identity's external id");
    same({ ...base, name: "renamed", identity: { ...base.identity, meta: { tier: 2 } } }, "identity's meta");
    same({ ...base, name: "renamed", identity: { ...base.identity, id: "id_2" } }, "another identity");
  });

  it("writes a key's fields right after 20,000 other keys (its kept encoding dropped), and again after a change", () => {
    const init = (i: number, name: string) => ({ valid: true, code: VerificationCode.VALID, keyId: `key_many_${i}`, name, apiId: "api", enabled: true, permissions: ["p"] });
    const bytesOf = (i: number, name: string) => Buffer.from(encodeVerifyKeyResponse(init(i, name)));
    for (let i = 0; i <= 20_000; i++) bytesOf(i, "n");
    // Key 0 was dropped; key 20,000 is kept. Both still encode to what toBinary writes.
    for (const i of [0, 1, 20_000]) {
      expect(bytesOf(i, "n").equals(Buffer.from(toBinary(VerifyKeyResponseSchema, create(VerifyKeyResponseSchema, init(i, "n")))))).toBe(true);
      expect(bytesOf(i, "m").equals(Buffer.from(toBinary(VerifyKeyResponseSchema, create(VerifyKeyResponseSchema, init(i, "m")))))).toBe(true);
    }
  });
});
