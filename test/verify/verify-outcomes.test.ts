/**
 * VerifyKey outcome codes, in the spec's order (first failure wins), and the
 * key and identity data a verification returns. In process, over the real
 * routes and interceptors (test/support/harness.ts), on both stores.
 */
import { expect, it } from "vitest";
import { CreditsOperation } from "../../gen/latchkey/v1/key_service_pb.js";
import { generateKey } from "../../src/domain/key-format.js";
import { codeOf, rpcError, unique, useHarness } from "../support/harness.js";
import {
  countingStore,
  createIdentityWithKeys,
  createKey,
  credits,
  describeEachStore,
  future,
  limit,
  MINUTE,
  past,
  verify,
} from "./support.js";

/** A well-formed key with a valid checksum that no store holds. */
const unknownKey = () => generateKey("sk", 16).plaintext;

/** Changes one character of the key body, so the checksum no longer matches. */
function corrupt(key: string): string {
  const last = key[key.length - 1];
  return key.slice(0, -1) + (last === "a" ? "b" : "a");
}

describeEachStore("VerifyKey outcome codes", (kind) => {
  let counting: ReturnType<typeof countingStore>;
  const h = useHarness({
    store: kind,
    wrapStore: (s) => {
      counting = countingStore(s);
      return counting.store;
    },
  });

  it("answers VALID for an enabled, unexpired key with nothing else asked", async () => {
    const { plaintext, id } = await createKey(h().admin);
    const res = await verify(h().admin, plaintext);
    expect(res.codeName).toBe("VALID");
    expect(res.valid).toBe(true);
    expect(res.keyId).toBe(id);
  });

  it("rejects a malformed key (checksum mismatch, bad alphabet, too short) as NOT_FOUND without a store lookup", async () => {
    const { plaintext } = await createKey(h().admin, { prefix: "sk" });
    counting.reset();
    for (const bad of [corrupt(plaintext), "sk_0OIl0OIl0OIl0OIl0OIl0OIl", "sk_abc", "x".repeat(512), "no separator at all"]) {
      const res = await verify(h().admin, bad);
      expect(res.codeName, bad).toBe("NOT_FOUND");
      expect(res.valid).toBe(false);
      expect(res.keyId).toBe("");
    }
    expect(counting.calls.get("getKeyByHash") ?? 0).toBe(0);
    // The wrapper does see lookups: a well-formed unknown key takes one.
    expect((await verify(h().admin, unknownKey())).codeName).toBe("NOT_FOUND");
    expect(counting.calls.get("getKeyByHash")).toBe(1);
  });

  it("answers NOT_FOUND for a well-formed key that does not exist", async () => {
    const res = await verify(h().admin, unknownKey());
    expect(res.codeName).toBe("NOT_FOUND");
    expect(res.valid).toBe(false);
    expect(res.keyId).toBe("");
    expect(res.identity).toBeUndefined();
  });

  it("answers NOT_FOUND for a deleted key, also when it was verified (and cached) just before", async () => {
    const { plaintext, id } = await createKey(h().admin);
    expect((await verify(h().admin, plaintext)).codeName).toBe("VALID");
    await h().admin.keys.deleteKey({ id });
    const res = await verify(h().admin, plaintext);
    expect(res.codeName).toBe("NOT_FOUND");
    expect(res.keyId).toBe("");
  });

  it("rejects a key of another api as NOT_FOUND, and accepts it for its own api", async () => {
    const { plaintext } = await createKey(h().admin, { apiId: "api_one" });
    const other = await verify(h().admin, plaintext, { apiId: "api_two" });
    expect(other.codeName).toBe("NOT_FOUND");
    expect(other.keyId).toBe("");
    expect(other.name).toBe("");
    expect((await verify(h().admin, plaintext, { apiId: "api_one" })).codeName).toBe("VALID");
    expect((await verify(h().admin, plaintext)).codeName, "no api_id: any api").toBe("VALID");
  });

  it("answers DISABLED for a disabled key", async () => {
    const { plaintext } = await createKey(h().admin, { enabled: false });
    const res = await verify(h().admin, plaintext);
    expect(res.codeName).toBe("DISABLED");
    expect(res.valid).toBe(false);
    expect(res.enabled).toBe(false);
  });

  it("answers EXPIRED for a key past its expiry", async () => {
    const { plaintext, id } = await createKey(h().admin, { expiresAt: future() });
    expect((await verify(h().admin, plaintext)).codeName).toBe("VALID");
    await h().admin.keys.updateKey({ key: { id, expiresAt: past() }, updateMask: { paths: ["expires_at"] } });
    const res = await verify(h().admin, plaintext);
    expect(res.codeName).toBe("EXPIRED");
    expect(res.valid).toBe(false);
  });

  it("answers DISABLED, not EXPIRED, for a key that is both disabled and expired", async () => {
    const { plaintext, id } = await createKey(h().admin, { enabled: false });
    await h().admin.keys.updateKey({ key: { id, expiresAt: past() }, updateMask: { paths: ["expires_at"] } });
    expect((await verify(h().admin, plaintext)).codeName).toBe("DISABLED");
  });

  it("reports the first failing check, in the order NOT_FOUND, DISABLED, EXPIRED, INSUFFICIENT_PERMISSIONS, RATE_LIMITED, USAGE_EXCEEDED", async () => {
    const c = h().admin;
    // A key that fails every check at once; each step below repairs the first failure.
    const { plaintext, id } = await createKey(c, {
      apiId: "api_order",
      enabled: false,
      permissions: ["docs.read"],
      ratelimits: [limit("burst", 1, MINUTE, false)],
      credits: credits(0),
    });
    await c.keys.updateKey({ key: { id, expiresAt: past() }, updateMask: { paths: ["expires_at"] } });
    const ask = { apiId: "api_order", permissions: "docs.write", ratelimits: [{ name: "burst", cost: 2n }] };

    expect((await verify(c, plaintext, { ...ask, apiId: "api_elsewhere" })).codeName).toBe("NOT_FOUND");
    expect((await verify(c, plaintext, ask)).codeName).toBe("DISABLED");
    await c.keys.updateKey({ key: { id, enabled: true }, updateMask: { paths: ["enabled"] } });
    expect((await verify(c, plaintext, ask)).codeName).toBe("EXPIRED");
    await c.keys.updateKey({ key: { id }, updateMask: { paths: ["expires_at"] } });
    expect((await verify(c, plaintext, ask)).codeName).toBe("INSUFFICIENT_PERMISSIONS");
    await c.keys.updateKey({ key: { id, permissions: ["docs.read", "docs.write"] }, updateMask: { paths: ["permissions"] } });
    const limited = await verify(c, plaintext, ask);
    expect(limited.codeName).toBe("RATE_LIMITED");
    expect(limited.ratelimits.map((r) => [r.name, r.exceeded])).toEqual([["burst", true]]);
    const exceeded = await verify(c, plaintext, { ...ask, ratelimits: [{ name: "burst", cost: 1n }] });
    expect(exceeded.codeName).toBe("USAGE_EXCEEDED");
    expect(exceeded.creditsRemaining).toBe(0n);
    await c.keys.updateCredits({ target: { case: "keyId", value: id }, operation: CreditsOperation.SET, value: 1n });
    const ok = await verify(c, plaintext, { ...ask, ratelimits: [{ name: "burst", cost: 1n }] });
    expect(ok.codeName).toBe("VALID");
    expect(ok.valid).toBe(true);
    expect(ok.creditsRemaining).toBe(0n);
  });

  it("answers INSUFFICIENT_PERMISSIONS when the permission query is not satisfied, with AND binding tighter than OR", async () => {
    const { plaintext } = await createKey(h().admin, { permissions: ["a", "b"] });
    const cases: [string, string][] = [
      ["a", "VALID"],
      ["c", "INSUFFICIENT_PERMISSIONS"],
      ["a AND b", "VALID"],
      ["a AND c", "INSUFFICIENT_PERMISSIONS"],
      ["c OR a", "VALID"],
      ["c OR d", "INSUFFICIENT_PERMISSIONS"],
      ["a AND (c OR b)", "VALID"],
      ["a AND (c OR d)", "INSUFFICIENT_PERMISSIONS"],
      ["(c OR a) AND d", "INSUFFICIENT_PERMISSIONS"],
      // AND binds tighter: (c AND a) OR b; read left to right it would be c AND (a OR b).
      ["c AND a OR b", "VALID"],
      // b OR (c AND d); read left to right it would be (b OR c) AND d.
      ["b OR c AND d", "VALID"],
      ["(b OR c) AND d", "INSUFFICIENT_PERMISSIONS"],
      ["a and b", "VALID"],
      ["((a))", "VALID"],
    ];
    const got: [string, string][] = [];
    for (const [query] of cases) got.push([query, (await verify(h().admin, plaintext, { permissions: query })).codeName]);
    expect(got).toEqual(cases);
  });

  it("rejects a permission query with a syntax error as INVALID_ARGUMENT naming `permissions`", async () => {
    const { plaintext } = await createKey(h().admin, { permissions: ["a", "b"] });
    for (const query of ["a AND", "AND a", "a OR OR b", "(a OR b", "a OR b)", "()", "a b", "a && b", "a AND (b"]) {
      const err = await rpcError(h().admin.keys.verifyKey({ key: plaintext, permissions: query }));
      expect(err.code, query).toBe(3); // INVALID_ARGUMENT
      expect(err.rawMessage, query).toMatch(/^permissions\b/);
    }
  });

  it("answers RATE_LIMITED once an applied limit is used up", async () => {
    const { plaintext } = await createKey(h().admin, { ratelimits: [limit("per-minute", 2, MINUTE)] });
    expect((await verify(h().admin, plaintext)).codeName).toBe("VALID");
    expect((await verify(h().admin, plaintext)).codeName).toBe("VALID");
    const res = await verify(h().admin, plaintext);
    expect(res.codeName).toBe("RATE_LIMITED");
    expect(res.valid).toBe(false);
  });

  it("answers USAGE_EXCEEDED once the credits are used up", async () => {
    const { plaintext } = await createKey(h().admin, { credits: credits(1) });
    expect((await verify(h().admin, plaintext)).codeName).toBe("VALID");
    const res = await verify(h().admin, plaintext);
    expect(res.codeName).toBe("USAGE_EXCEEDED");
    expect(res.valid).toBe(false);
    expect(res.creditsRemaining).toBe(0n);
  });

  it("answers an unverifiable key with valid=false and a code, never with an RPC error", async () => {
    const c = h().admin;
    const disabled = await createKey(c, { enabled: false });
    const limited = await createKey(c, { ratelimits: [limit("l", 1, MINUTE)] });
    await verify(c, limited.plaintext);
    const broke = await createKey(c, { credits: credits(0) });
    const unpermitted = await createKey(c, { permissions: ["x"] });
    const answers = await Promise.all([
      c.keys.verifyKey({ key: unknownKey() }),
      c.keys.verifyKey({ key: "garbage" }),
      c.keys.verifyKey({ key: disabled.plaintext }),
      c.keys.verifyKey({ key: limited.plaintext }),
      c.keys.verifyKey({ key: broke.plaintext }),
      c.keys.verifyKey({ key: unpermitted.plaintext, permissions: "y" }),
    ]);
    expect(answers.map((a) => a.valid)).toEqual([false, false, false, false, false, false]);
    expect(answers.every((a) => a.code !== 0)).toBe(true);
  });

  it("rejects a request without a key as INVALID_ARGUMENT (a bad request is an error, not an answer)", async () => {
    expect(await codeOf(h().admin.keys.verifyKey({ key: "" }))).toBe("InvalidArgument");
  });

  it("returns the key's data and its identity with a verification", async () => {
    const c = h().admin;
    const ext = unique("user_2NNEqL");
    const { identity } = await c.identities.createIdentity({ externalId: ext, meta: { plan: "pro", seats: 3 } });
    const expiresAt = future();
    const { plaintext, id } = await createKey(c, {
      apiId: "api_data",
      name: "ci deploy key",
      meta: { team: "infra", tags: ["a", "b"] },
      expiresAt,
      permissions: ["docs.read", "docs.write"],
      credits: credits(5),
      identity: { case: "identityId", value: identity!.id },
    });
    const res = await verify(c, plaintext, { apiId: "api_data", permissions: "docs.read" });
    expect(res.codeName).toBe("VALID");
    expect(res.keyId).toBe(id);
    expect(res.apiId).toBe("api_data");
    expect(res.name).toBe("ci deploy key");
    expect(res.meta).toEqual({ team: "infra", tags: ["a", "b"] });
    expect(res.expiresAt?.seconds).toBe(expiresAt.seconds);
    expect(res.enabled).toBe(true);
    expect(res.creditsRemaining).toBe(4n);
    expect([...res.permissions].sort()).toEqual(["docs.read", "docs.write"]);
    expect(res.identity?.id).toBe(identity!.id);
    expect(res.identity?.externalId).toBe(ext);
    expect(res.identity?.meta).toEqual({ plan: "pro", seats: 3 });
  });

  it("returns key data, but no credits, for a key without a balance, and no identity for a key without one", async () => {
    const { plaintext } = await createKey(h().admin, { name: "plain" });
    const res = await verify(h().admin, plaintext);
    expect(res.name).toBe("plain");
    expect(res.creditsRemaining).toBeUndefined();
    expect(res.identity).toBeUndefined();
  });

  it("shows an identity's new meta on the next verification of any of its keys", async () => {
    const c = h().admin;
    const { identityId, keys } = await createIdentityWithKeys(c, 3, { externalId: unique("org_01E4"), meta: { plan: "free" } });
    for (const k of keys) expect((await verify(c, k)).identity?.meta).toEqual({ plan: "free" });
    await c.identities.updateIdentity({ identity: { id: identityId, meta: { plan: "enterprise" } }, updateMask: { paths: ["meta"] } });
    for (const k of keys) expect((await verify(c, k)).identity?.meta).toEqual({ plan: "enterprise" });
  });

  it("shows an identity's new limits and credits on the next verification of its keys", async () => {
    const c = h().admin;
    const { identityId, keys } = await createIdentityWithKeys(c, 2, {
      externalId: unique("auth0|5f7c"),
      ratelimits: [limit("requests", 100, MINUTE)],
      credits: credits(50),
    });
    const before = await verify(c, keys[0]);
    expect(before.ratelimits.map((r) => r.limit)).toEqual([100n]);
    expect(before.creditsRemaining).toBe(49n);
    await c.identities.updateIdentity({
      identity: { id: identityId, ratelimits: [limit("requests", 7, MINUTE)], credits: credits(3) },
      updateMask: { paths: ["ratelimits", "credits"] },
    });
    const after = await verify(c, keys[1]);
    expect(after.ratelimits.map((r) => r.limit)).toEqual([7n]);
    expect(after.creditsRemaining).toBe(2n);
  });

  it("answers NOT_FOUND for the keys of an identity deleted with its keys", async () => {
    const c = h().admin;
    const { identityId, keys } = await createIdentityWithKeys(c, 2, { externalId: unique("google-oauth2|") });
    for (const k of keys) expect((await verify(c, k)).codeName).toBe("VALID");
    await c.identities.deleteIdentity({ lookup: { case: "id", value: identityId }, deleteKeys: true });
    for (const k of keys) expect((await verify(c, k)).codeName).toBe("NOT_FOUND");
  });
});
