import { describe, expect, it } from "vitest";
import { ID_PATTERNS } from "../../src/domain/ids.js";
import { unique, useHarness } from "../support/harness.js";
import { credits, mask, msOf, ratelimit } from "../support/proto.js";

describe("IdentityService (happy paths)", () => {
  const h = useHarness();

  describe("CreateIdentity", () => {
    it("creates an identity with meta, ratelimits and credits", async () => {
      const externalId = unique("user");
      const before = Date.now();
      const { identity } = await h().admin.identities.createIdentity({
        externalId,
        meta: { plan: "pro", seats: 3, tags: ["a", "b"], nested: { ok: true, none: null } },
        ratelimits: [ratelimit("requests", 100, 60, true), ratelimit("tokens", 5000, 3600)],
        credits: credits(1000, { interval: "monthly", amount: 1000, day: 31 }),
      });
      expect(identity!.id).toMatch(ID_PATTERNS.identity);
      expect(identity!.externalId).toBe(externalId);
      expect(identity!.meta).toEqual({ plan: "pro", seats: 3, tags: ["a", "b"], nested: { ok: true, none: null } });
      expect(identity!.ratelimits.map((r) => [r.name, r.limit, r.duration?.seconds, r.autoApply])).toEqual([
        ["requests", 100n, 60n, true],
        ["tokens", 5000n, 3600n, false],
      ]);
      expect(identity!.credits?.remaining).toBe(1000n);
      expect(identity!.credits?.refill).toMatchObject({ amount: 1000n, refillDay: 31 });
      expect(msOf(identity!.createdAt)).toBeGreaterThanOrEqual(before);
      expect(msOf(identity!.updatedAt)).toBe(msOf(identity!.createdAt));

      const stored = await h().store.getIdentity(identity!.id);
      expect(stored).toMatchObject({ externalId, meta: identity!.meta, credits: { remaining: 1000 } });
    });

    it("creates an identity with nothing but an external_id, unlimited and without limits", async () => {
      const { identity } = await h().admin.identities.createIdentity({ externalId: unique("bare") });
      expect(identity!.meta).toEqual({});
      expect(identity!.ratelimits).toEqual([]);
      expect(identity!.credits).toBeUndefined();
    });

    it.each([
      ["Clerk", "user_2NNEqL2nrIRdJ194ndJqAHwEfxC"],
      ["WorkOS", "org_01EHZNVPK3SFK441A1RGBFSHRT"],
      ["Auth0", "auth0|5f7c8ec7c33c6c004bbafe82"],
      ["Auth0 social", "google-oauth2|104737485674920474633"],
      ["email-like", "alice+test@example.com"],
      ["URN-like", "tenant:42.user:7"],
    ])("accepts a %s external_id", async (_name, base) => {
      const externalId = `${base}${unique("").slice(1)}`;
      const { identity } = await h().admin.identities.createIdentity({ externalId });
      expect(identity!.externalId).toBe(externalId);
      const { identity: got } = await h().admin.identities.getIdentity({ lookup: { case: "externalId", value: externalId } });
      expect(got!.id).toBe(identity!.id);
    });
  });

  describe("GetIdentity", () => {
    it("finds an identity by id and by external_id", async () => {
      const { identity } = await h().admin.identities.createIdentity({ externalId: unique("user"), meta: { a: 1 } });
      const byId = await h().admin.identities.getIdentity({ lookup: { case: "id", value: identity!.id } });
      const byExternal = await h().admin.identities.getIdentity({ lookup: { case: "externalId", value: identity!.externalId } });
      expect(byId.identity).toEqual(identity);
      expect(byExternal.identity).toEqual(identity);
    });
  });

  describe("ListIdentities", () => {
    it("pages through every identity with next_page_token", async () => {
      const created: string[] = [];
      for (let i = 0; i < 5; i++) created.push((await h().admin.identities.createIdentity({ externalId: `page-${i}` })).identity!.id);
      const pages: string[][] = [];
      let pageToken = "";
      do {
        const res = await h().admin.identities.listIdentities({ pageSize: 2, pageToken });
        pages.push(res.identities.map((i) => i.id));
        pageToken = res.nextPageToken;
      } while (pageToken !== "");
      expect(pages.map((p) => p.length)).toEqual([2, 2, 1]);
      expect(pages.flat()).toEqual([...created].sort());
    });

    it("returns every identity on one page with the default page size", async () => {
      for (let i = 0; i < 3; i++) await h().admin.identities.createIdentity({ externalId: unique("d") });
      const res = await h().admin.identities.listIdentities({});
      expect(res.identities).toHaveLength(3);
      expect(res.nextPageToken).toBe("");
    });

    it("returns no token when the last page is exactly full", async () => {
      for (let i = 0; i < 2; i++) await h().admin.identities.createIdentity({ externalId: unique("full") });
      const first = await h().admin.identities.listIdentities({ pageSize: 2 });
      expect(first.identities).toHaveLength(2);
      expect(first.nextPageToken).toBe("");
    });

    it("searches external ids by case-insensitive substring, paged", async () => {
      for (const e of ["Acme-Corp-1", "acme-corp-2", "ACME-CORP-3", "other-co"]) await h().admin.identities.createIdentity({ externalId: e });
      const first = await h().admin.identities.listIdentities({ search: "aCmE-cOrP", pageSize: 2 });
      const second = await h().admin.identities.listIdentities({ search: "aCmE-cOrP", pageSize: 2, pageToken: first.nextPageToken });
      const found = [...first.identities, ...second.identities].map((i) => i.externalId).sort();
      expect(found).toEqual(["ACME-CORP-3", "Acme-Corp-1", "acme-corp-2"]);
      expect(second.nextPageToken).toBe("");
    });

    it("takes a search with regex metacharacters literally", async () => {
      await h().admin.identities.createIdentity({ externalId: "alice" });
      await h().admin.identities.createIdentity({ externalId: "a.c" });
      await h().admin.identities.createIdentity({ externalId: "auth0|bob" });
      const search = async (s: string) => (await h().admin.identities.listIdentities({ search: s })).identities.map((i) => i.externalId);
      expect(await search(".*")).toEqual([]);
      expect(await search("a.c")).toEqual(["a.c"]);
      expect(await search("$")).toEqual([]);
      expect(await search("|")).toEqual(["auth0|bob"]);
      expect(await search("^a")).toEqual([]);
    });
  });

  describe("UpdateIdentity", () => {
    it("changes only the fields named in update_mask", async () => {
      const { identity } = await h().admin.identities.createIdentity({
        externalId: unique("user"),
        meta: { plan: "free" },
        ratelimits: [ratelimit("rpm", 10, 60)],
        credits: credits(5),
      });
      const { identity: updated } = await h().admin.identities.updateIdentity({
        identity: { id: identity!.id, meta: { plan: "pro" }, ratelimits: [], externalId: "ignored-not-in-mask" },
        updateMask: mask("meta"),
      });
      expect(updated!.meta).toEqual({ plan: "pro" });
      expect(updated!.externalId).toBe(identity!.externalId);
      expect(updated!.ratelimits).toEqual(identity!.ratelimits);
      expect(updated!.credits).toEqual(identity!.credits);
      expect(msOf(updated!.updatedAt)).toBeGreaterThanOrEqual(msOf(identity!.updatedAt)!);
      const { identity: got } = await h().admin.identities.getIdentity({ lookup: { case: "id", value: identity!.id } });
      expect(got).toEqual(updated);
    });

    it("replaces ratelimits and credits", async () => {
      const { identity } = await h().admin.identities.createIdentity({ externalId: unique("user"), ratelimits: [ratelimit("a", 1, 1)] });
      const { identity: updated } = await h().admin.identities.updateIdentity({
        identity: { id: identity!.id, ratelimits: [ratelimit("b", 2, 2, true)], credits: credits(9, { interval: "daily", amount: 9 }) },
        updateMask: mask("ratelimits", "credits"),
      });
      expect(updated!.ratelimits.map((r) => r.name)).toEqual(["b"]);
      expect(updated!.credits?.remaining).toBe(9n);
      expect(updated!.credits?.refill?.amount).toBe(9n);
    });

    it("renames the external_id: the new one finds the identity and its keys, the old one nothing", async () => {
      const oldId = unique("old");
      const { identity } = await h().admin.identities.createIdentity({ externalId: oldId });
      const { key } = await h().admin.keys.createKey({ apiId: "api1", identity: { case: "identityId", value: identity!.id } });
      const newId = unique("new");
      const { identity: renamed } = await h().admin.identities.updateIdentity({
        identity: { id: identity!.id, externalId: newId },
        updateMask: mask("external_id"),
      });
      expect(renamed!.externalId).toBe(newId);
      const { identity: got } = await h().admin.identities.getIdentity({ lookup: { case: "externalId", value: newId } });
      expect(got!.id).toBe(identity!.id);
      expect((await h().store.getIdentityByExternalId(oldId))).toBeNull();
      expect((await h().admin.keys.getKey({ id: key!.id })).key!.externalId).toBe(newId);
      const listed = await h().admin.keys.listKeys({ externalId: newId });
      expect(listed.keys.map((k) => k.id)).toEqual([key!.id]);
    });

    it("clears meta, ratelimits and credits named in the mask but absent from the identity", async () => {
      const { identity } = await h().admin.identities.createIdentity({
        externalId: unique("user"),
        meta: { a: 1 },
        ratelimits: [ratelimit("rpm", 10, 60)],
        credits: credits(5),
      });
      const { identity: cleared } = await h().admin.identities.updateIdentity({
        identity: { id: identity!.id },
        updateMask: mask("meta", "ratelimits", "credits"),
      });
      expect(cleared!.meta).toEqual({});
      expect(cleared!.ratelimits).toEqual([]);
      expect(cleared!.credits).toBeUndefined();
      expect(await h().store.getIdentity(identity!.id)).toMatchObject({ meta: {}, ratelimits: [], credits: null });
    });
  });

  describe("DeleteIdentity", () => {
    it("deletes an identity without keys", async () => {
      const { identity } = await h().admin.identities.createIdentity({ externalId: unique("user") });
      const res = await h().admin.identities.deleteIdentity({ lookup: { case: "id", value: identity!.id } });
      expect(res.deletedKeys).toBe(0n);
      expect(res.unlinkedKeys).toBe(0n);
      expect(await h().store.getIdentity(identity!.id)).toBeNull();
    });

    it("keeps the keys of a deleted identity, unlinked and still listed", async () => {
      const externalId = unique("user");
      const k1 = await h().admin.keys.createKey({ apiId: "api1", identity: { case: "externalId", value: externalId } });
      const k2 = await h().admin.keys.createKey({ apiId: "api1", identity: { case: "externalId", value: externalId } });
      const res = await h().admin.identities.deleteIdentity({ lookup: { case: "externalId", value: externalId } });
      expect(res).toMatchObject({ deletedKeys: 0n, unlinkedKeys: 2n });
      for (const k of [k1, k2]) {
        const { key } = await h().admin.keys.getKey({ id: k.key!.id });
        expect(key!.identityId).toBe("");
        expect(key!.externalId).toBe("");
        expect(key!.enabled).toBe(true);
      }
      expect(await h().store.getIdentityByExternalId(externalId)).toBeNull();
      expect((await h().admin.keys.listKeys({ apiId: "api1" })).keys).toHaveLength(2);
    });

    it("deletes the identity's keys too when delete_keys is set, and no other keys", async () => {
      const externalId = unique("user");
      const mine = await h().admin.keys.createKey({ apiId: "api1", identity: { case: "externalId", value: externalId } });
      const other = await h().admin.keys.createKey({ apiId: "api1" });
      const res = await h().admin.identities.deleteIdentity({ lookup: { case: "externalId", value: externalId }, deleteKeys: true });
      expect(res).toMatchObject({ deletedKeys: 1n, unlinkedKeys: 0n });
      expect(await h().store.getKey(mine.key!.id)).toBeNull();
      expect(await h().store.getKey(other.key!.id)).not.toBeNull();
    });
  });
});
