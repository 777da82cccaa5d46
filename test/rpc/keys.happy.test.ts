import { Code } from "@connectrpc/connect";
import { createHash } from "node:crypto";
import { describe, expect, it } from "vitest";
import { CreditsOperation } from "../../gen/latchkey/v1/key_service_pb.js";
import { ID_PATTERNS } from "../../src/domain/ids.js";
import { base58Decode, hasValidChecksum } from "../../src/domain/key-format.js";
import { rpcError, unique, useHarness } from "../support/harness.js";
import { at, credits, mask, msOf, ratelimit } from "../support/proto.js";

const BASE58 = /^[1-9A-HJ-NP-Za-km-z]+$/;
const sha256 = (s: string) => createHash("sha256").update(s).digest("hex");
const json = (v: unknown) => JSON.stringify(v, (_k, x) => (typeof x === "bigint" ? x.toString() : x));

describe("KeyService (happy paths)", () => {
  const h = useHarness();

  describe("CreateKey", () => {
    it("returns a `prefix_` + base58 key with a valid checksum, once", async () => {
      const res = await h().admin.keys.createKey({ apiId: "api_live", prefix: "sk", name: "ci key" });
      const [prefix, body] = res.plaintext.split("_");
      expect(prefix).toBe("sk");
      expect(body).toMatch(BASE58);
      expect(base58Decode(body)!.length).toBe(16 + 4);
      expect(hasValidChecksum(res.plaintext)).toBe(true);
      expect(res.key!.id).toMatch(ID_PATTERNS.key);
      expect(res.key!.start).toBe(res.plaintext.slice(0, "sk_".length + 4));
      expect(res.key).toMatchObject({ apiId: "api_live", name: "ci key", enabled: true, identityId: "", externalId: "" });
      expect(res.key!.expiresAt).toBeUndefined();
      expect(res.key!.lastUsedAt).toBeUndefined();
    });

    it("makes a key without a prefix, and of the requested length", async () => {
      const res = await h().admin.keys.createKey({ apiId: "api1", byteLength: 48 });
      expect(res.plaintext).toMatch(BASE58);
      expect(base58Decode(res.plaintext)!.length).toBe(48 + 4);
      expect(hasValidChecksum(res.plaintext)).toBe(true);
      expect(res.key!.start).toBe(res.plaintext.slice(0, 4));
    });

    it("makes a different secret every time", async () => {
      const a = await h().admin.keys.createKey({ apiId: "api1", prefix: "sk" });
      const b = await h().admin.keys.createKey({ apiId: "api1", prefix: "sk" });
      expect(a.plaintext).not.toBe(b.plaintext);
      expect(a.key!.id).not.toBe(b.key!.id);
    });

    it("stores only the SHA-256 hash of the key, and never returns the plaintext again", async () => {
      const { plaintext, key } = await h().admin.keys.createKey({ apiId: "api1", prefix: "sk" });
      const body = plaintext.split("_")[1];
      const stored = await h().store.getKey(key!.id);
      expect(stored!.hash).toBe(sha256(plaintext));
      expect(json(stored)).not.toContain(body);
      expect((await h().store.getKeyByHash(sha256(plaintext)))!.id).toBe(key!.id);

      const got = await h().admin.keys.getKey({ id: key!.id });
      const listed = await h().admin.keys.listKeys({ apiId: "api1" });
      const updated = await h().admin.keys.updateKey({ key: { id: key!.id, name: "renamed" }, updateMask: mask("name") });
      for (const res of [got, listed, updated]) {
        expect(json(res)).not.toContain(body);
        expect(json(res)).not.toContain(sha256(plaintext));
      }
    });

    it("keeps every setting of the new key", async () => {
      const expiresAt = Date.now() + 3_600_000;
      const { key } = await h().admin.keys.createKey({
        apiId: "api1",
        name: "full",
        meta: { team: "core", n: 1 },
        expiresAt: at(expiresAt),
        enabled: false,
        credits: credits(50, { interval: "monthly", amount: 50, day: 1 }),
        ratelimits: [ratelimit("rpm", 60, 60, true)],
        permissions: ["docs.read", "docs.write", "docs.read"],
      });
      expect(key).toMatchObject({ name: "full", meta: { team: "core", n: 1 }, enabled: false, permissions: ["docs.read", "docs.write"] });
      expect(msOf(key!.expiresAt)).toBe(expiresAt);
      expect(key!.credits).toMatchObject({ remaining: 50n, refill: { amount: 50n, refillDay: 1 } });
      expect(key!.ratelimits.map((r) => [r.name, r.limit, r.autoApply])).toEqual([["rpm", 60n, true]]);
      expect((await h().admin.keys.getKey({ id: key!.id })).key).toEqual(key);
    });

    it("creates the identity for an unknown external_id, and reuses it for the next key", async () => {
      const externalId = `user_${unique("clerk")}`;
      const first = await h().admin.keys.createKey({ apiId: "api1", identity: { case: "externalId", value: externalId } });
      const { identity } = await h().admin.identities.getIdentity({ lookup: { case: "externalId", value: externalId } });
      expect(first.key).toMatchObject({ identityId: identity!.id, externalId });
      expect(identity).toMatchObject({ meta: {}, ratelimits: [] });

      const second = await h().admin.keys.createKey({ apiId: "api2", identity: { case: "externalId", value: externalId } });
      expect(second.key!.identityId).toBe(identity!.id);
      expect((await h().snapshot()).identities).toHaveLength(1);
    });

    it("creates exactly one identity when 20 keys for a new external_id are created at once", async () => {
      const externalId = unique("burst");
      const results = await Promise.all(
        Array.from({ length: 20 }, () => h().admin.keys.createKey({ apiId: "api1", identity: { case: "externalId", value: externalId } })),
      );
      const identityIds = new Set(results.map((r) => r.key!.identityId));
      expect(identityIds.size).toBe(1);
      const snap = await h().snapshot();
      expect(snap.identities.map((i) => i.id)).toEqual([...identityIds]);
      expect(snap.keys).toHaveLength(20);
    });

    it("links the key to an identity given by id", async () => {
      const { identity } = await h().admin.identities.createIdentity({ externalId: unique("org") });
      const { key } = await h().admin.keys.createKey({ apiId: "api1", identity: { case: "identityId", value: identity!.id } });
      expect(key).toMatchObject({ identityId: identity!.id, externalId: identity!.externalId });
    });
  });

  describe("GetKey", () => {
    it("returns the key with its identity's external_id", async () => {
      const externalId = unique("user");
      const { key } = await h().admin.keys.createKey({ apiId: "api1", name: "k", identity: { case: "externalId", value: externalId } });
      const got = await h().admin.keys.getKey({ id: key!.id });
      expect(got.key).toEqual(key);
      expect(got.key!.externalId).toBe(externalId);
    });
  });

  describe("ListKeys", () => {
    async function pages(req: { apiId?: string; identityId?: string; externalId?: string }, pageSize: number) {
      const out: string[][] = [];
      let pageToken = "";
      do {
        const res = await h().admin.keys.listKeys({ ...req, pageSize, pageToken });
        out.push(res.keys.map((k) => k.id));
        pageToken = res.nextPageToken;
      } while (pageToken !== "");
      return out;
    }

    it("pages through the keys of one api in id order", async () => {
      const ids: string[] = [];
      for (let i = 0; i < 5; i++) ids.push((await h().admin.keys.createKey({ apiId: "api_a" })).key!.id);
      await h().admin.keys.createKey({ apiId: "api_b" });
      const result = await pages({ apiId: "api_a" }, 2);
      expect(result.map((p) => p.length)).toEqual([2, 2, 1]);
      expect(result.flat()).toEqual([...ids].sort());
    });

    it("lists the keys of an identity, by identity_id or by external_id, across apis", async () => {
      const externalId = unique("user");
      const mine: string[] = [];
      for (const apiId of ["api_a", "api_b", "api_a"]) {
        mine.push((await h().admin.keys.createKey({ apiId, identity: { case: "externalId", value: externalId } })).key!.id);
      }
      await h().admin.keys.createKey({ apiId: "api_a" });
      await h().admin.keys.createKey({ apiId: "api_a", identity: { case: "externalId", value: unique("other") } });
      const identityId = (await h().store.getIdentityByExternalId(externalId))!.id;

      expect((await pages({ identityId }, 2)).flat()).toEqual([...mine].sort());
      expect((await pages({ externalId }, 1)).flat()).toEqual([...mine].sort());
      const onlyA = await h().admin.keys.listKeys({ apiId: "api_a", externalId });
      expect(onlyA.keys.map((k) => k.id)).toEqual([mine[0], mine[2]].sort());
      expect(onlyA.keys.every((k) => k.externalId === externalId)).toBe(true);
    });

    it("lists nothing for an external_id without an identity", async () => {
      await h().admin.keys.createKey({ apiId: "api_a" });
      const res = await h().admin.keys.listKeys({ externalId: unique("nobody") });
      expect(res).toMatchObject({ keys: [], nextPageToken: "" });
    });

    it("lists every key when no filter is given", async () => {
      await h().admin.keys.createKey({ apiId: "api_a" });
      await h().admin.keys.createKey({ apiId: "api_b" });
      expect((await h().admin.keys.listKeys({})).keys).toHaveLength(2);
    });
  });

  describe("UpdateKey", () => {
    it("changes only the fields named in update_mask", async () => {
      const { key } = await h().admin.keys.createKey({ apiId: "api1", name: "old", meta: { a: 1 }, permissions: ["p1"] });
      const { key: updated } = await h().admin.keys.updateKey({
        key: { id: key!.id, name: "new", meta: { b: 2 }, permissions: [], enabled: false },
        updateMask: mask("name", "meta"),
      });
      expect(updated).toMatchObject({ name: "new", meta: { b: 2 }, permissions: ["p1"], enabled: true, apiId: "api1" });
      expect((await h().admin.keys.getKey({ id: key!.id })).key).toEqual(updated);
    });

    it("disables and re-enables a key", async () => {
      const { key } = await h().admin.keys.createKey({ apiId: "api1" });
      const off = await h().admin.keys.updateKey({ key: { id: key!.id, enabled: false }, updateMask: mask("enabled") });
      expect(off.key!.enabled).toBe(false);
      expect((await h().store.getKey(key!.id))!.enabled).toBe(false);
      const on = await h().admin.keys.updateKey({ key: { id: key!.id, enabled: true }, updateMask: mask("enabled") });
      expect(on.key!.enabled).toBe(true);
    });

    it("sets and clears expires_at", async () => {
      const { key } = await h().admin.keys.createKey({ apiId: "api1" });
      const when = Date.now() + 86_400_000;
      const set = await h().admin.keys.updateKey({ key: { id: key!.id, expiresAt: at(when) }, updateMask: mask("expires_at") });
      expect(msOf(set.key!.expiresAt)).toBe(when);
      const cleared = await h().admin.keys.updateKey({ key: { id: key!.id }, updateMask: mask("expires_at") });
      expect(cleared.key!.expiresAt).toBeUndefined();
      expect((await h().store.getKey(key!.id))!.expiresAt).toBeNull();
    });

    it("replaces credits, ratelimits and permissions", async () => {
      const { key } = await h().admin.keys.createKey({ apiId: "api1", ratelimits: [ratelimit("a", 1, 1)] });
      const { key: updated } = await h().admin.keys.updateKey({
        key: { id: key!.id, credits: credits(7), ratelimits: [ratelimit("b", 2, 60, true)], permissions: ["x", "y", "x"] },
        updateMask: mask("credits", "ratelimits", "permissions"),
      });
      expect(updated!.credits?.remaining).toBe(7n);
      expect(updated!.ratelimits.map((r) => r.name)).toEqual(["b"]);
      expect(updated!.permissions).toEqual(["x", "y"]);
    });

    it("attaches, moves and detaches the identity", async () => {
      const { key } = await h().admin.keys.createKey({ apiId: "api1" });
      const { identity: first } = await h().admin.identities.createIdentity({ externalId: unique("first") });

      const attached = await h().admin.keys.updateKey({ key: { id: key!.id, identityId: first!.id }, updateMask: mask("identity_id") });
      expect(attached.key).toMatchObject({ identityId: first!.id, externalId: first!.externalId });

      const secondExternal = unique("second");
      const moved = await h().admin.keys.updateKey({ key: { id: key!.id, externalId: secondExternal }, updateMask: mask("external_id") });
      const second = await h().store.getIdentityByExternalId(secondExternal);
      expect(second).not.toBeNull();
      expect(moved.key).toMatchObject({ identityId: second!.id, externalId: secondExternal });
      expect((await h().admin.keys.listKeys({ identityId: first!.id })).keys).toEqual([]);

      const detached = await h().admin.keys.updateKey({ key: { id: key!.id }, updateMask: mask("identity_id") });
      expect(detached.key).toMatchObject({ identityId: "", externalId: "" });
      expect((await h().store.getKey(key!.id))!.identityId).toBeNull();
      // Identities outlive their keys.
      expect(await h().store.getIdentity(second!.id)).not.toBeNull();
    });

    it("detaches the identity through an empty external_id too", async () => {
      const { key } = await h().admin.keys.createKey({ apiId: "api1", identity: { case: "externalId", value: unique("u") } });
      const res = await h().admin.keys.updateKey({ key: { id: key!.id, externalId: "" }, updateMask: mask("external_id") });
      expect(res.key!.identityId).toBe("");
    });
  });

  describe("DeleteKey", () => {
    it("deletes the key and nothing else", async () => {
      const externalId = unique("user");
      const gone = await h().admin.keys.createKey({ apiId: "api1", identity: { case: "externalId", value: externalId } });
      const kept = await h().admin.keys.createKey({ apiId: "api1", identity: { case: "externalId", value: externalId } });
      await h().admin.keys.deleteKey({ id: gone.key!.id });
      expect((await rpcError(h().admin.keys.getKey({ id: gone.key!.id }))).code).toBe(Code.NotFound);
      expect(await h().store.getKeyByHash(sha256(gone.plaintext))).toBeNull();
      expect((await h().admin.keys.getKey({ id: kept.key!.id })).key!.id).toBe(kept.key!.id);
      expect(await h().store.getIdentityByExternalId(externalId)).not.toBeNull();
    });
  });

  describe("RerollKey", () => {
    it("issues a new secret with the same configuration; the old key expires after the grace period", async () => {
      const externalId = unique("user");
      const created = await h().admin.keys.createKey({
        apiId: "api1",
        prefix: "sk",
        byteLength: 32,
        name: "prod",
        meta: { env: "prod" },
        credits: credits(10),
        ratelimits: [ratelimit("rpm", 5, 60, true)],
        permissions: ["read"],
        identity: { case: "externalId", value: externalId },
      });
      const old = created.key!;
      const before = Date.now();
      const res = await h().admin.keys.rerollKey({ id: old.id, gracePeriod: { seconds: 3600n } });
      const after = Date.now();

      expect(res.key!.id).not.toBe(old.id);
      expect(res.key!.id).toMatch(ID_PATTERNS.key);
      expect(res.plaintext).not.toBe(created.plaintext);
      expect(res.plaintext.startsWith("sk_")).toBe(true);
      expect(hasValidChecksum(res.plaintext)).toBe(true);
      expect(base58Decode(res.plaintext.split("_")[1])!.length).toBe(32 + 4);
      const { id: _a, start: _b, createdAt: _c, updatedAt: _d, ...oldConfig } = old;
      const { id: _e, start: _f, createdAt: _g, updatedAt: _h, ...newConfig } = res.key!;
      expect(newConfig).toEqual(oldConfig);

      const graceEnd = msOf(res.oldKeyExpiresAt)!;
      expect(graceEnd).toBeGreaterThanOrEqual(before + 3_600_000);
      expect(graceEnd).toBeLessThanOrEqual(after + 3_600_000);
      const oldNow = (await h().admin.keys.getKey({ id: old.id })).key!;
      expect(msOf(oldNow.expiresAt)).toBe(graceEnd);
      expect(oldNow.enabled).toBe(true);
      // Both secrets resolve during the grace period, and draw from one balance
      // (moved to the new key): a spend through the old key is gone for both.
      expect((await h().store.getKeyByHash(sha256(created.plaintext)))!.id).toBe(old.id);
      expect((await h().store.getKeyByHash(sha256(res.plaintext)))!.id).toBe(res.key!.id);
      expect((await h().admin.keys.verifyKey({ key: created.plaintext })).creditsRemaining).toBe(9n);
      expect((await h().admin.keys.getKey({ id: res.key!.id })).key!.credits!.remaining).toBe(9n);
      expect((await h().admin.keys.getKey({ id: old.id })).key!.credits!.remaining).toBe(9n);
    });

    it("expires the old key at once without a grace period", async () => {
      const { key } = await h().admin.keys.createKey({ apiId: "api1" });
      const before = Date.now();
      const res = await h().admin.keys.rerollKey({ id: key!.id });
      expect(msOf(res.oldKeyExpiresAt)).toBeGreaterThanOrEqual(before);
      expect(msOf(res.oldKeyExpiresAt)).toBeLessThanOrEqual(Date.now());
      expect(res.key!.expiresAt).toBeUndefined();
    });

    it("keeps an earlier expiry of the old key", async () => {
      const soon = Date.now() + 60_000;
      const { key } = await h().admin.keys.createKey({ apiId: "api1", expiresAt: at(soon) });
      const res = await h().admin.keys.rerollKey({ id: key!.id, gracePeriod: { seconds: 86_400n } });
      expect(msOf(res.oldKeyExpiresAt)).toBe(soon);
      expect(msOf(res.key!.expiresAt)).toBe(soon);
    });
  });

  describe("UpdateCredits", () => {
    const targets = [
      {
        name: "a key",
        make: async (c?: ReturnType<typeof credits>) => {
          const { key } = await h().admin.keys.createKey({ apiId: "api1", credits: c });
          return { target: { case: "keyId" as const, value: key!.id }, stored: async () => (await h().store.getKey(key!.id))!.credits };
        },
      },
      {
        name: "an identity",
        make: async (c?: ReturnType<typeof credits>) => {
          const { identity } = await h().admin.identities.createIdentity({ externalId: unique("u"), credits: c });
          return {
            target: { case: "identityId" as const, value: identity!.id },
            stored: async () => (await h().store.getIdentity(identity!.id))!.credits,
          };
        },
      },
    ];

    describe.each(targets)("of $name", ({ make }) => {
      it("sets, increments and decrements the balance, stopping at zero", async () => {
        const { target, stored } = await make(credits(10));
        const update = (operation: CreditsOperation, value?: number) =>
          h().admin.keys.updateCredits({ target, operation, value: value === undefined ? undefined : BigInt(value) });
        expect((await update(CreditsOperation.SET, 100)).credits?.remaining).toBe(100n);
        expect((await update(CreditsOperation.INCREMENT, 5)).credits?.remaining).toBe(105n);
        expect((await update(CreditsOperation.DECREMENT, 30)).credits?.remaining).toBe(75n);
        expect((await update(CreditsOperation.DECREMENT, 1000)).credits?.remaining).toBe(0n);
        expect(await stored()).toEqual({ remaining: 0, refill: null });
      });

      it("makes the balance unlimited with SET and no value, and limited again with a value", async () => {
        const { target, stored } = await make(credits(10));
        const unlimited = await h().admin.keys.updateCredits({ target, operation: CreditsOperation.SET });
        expect(unlimited.credits).toBeUndefined();
        expect(await stored()).toBeNull();
        const limited = await h().admin.keys.updateCredits({ target, operation: CreditsOperation.SET, value: 3n });
        expect(limited.credits?.remaining).toBe(3n);
      });

      it("keeps the refill rule when the balance is set", async () => {
        const { target, stored } = await make(credits(10, { interval: "monthly", amount: 500, day: 15 }));
        const res = await h().admin.keys.updateCredits({ target, operation: CreditsOperation.SET, value: 1n });
        expect(res.credits).toMatchObject({ remaining: 1n, refill: { amount: 500n, refillDay: 15 } });
        expect(await stored()).toMatchObject({ remaining: 1, refill: { interval: "monthly", amount: 500, refillDay: 15 } });
      });
    });
  });
});
