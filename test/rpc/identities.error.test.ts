import { Code } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { newId } from "../../src/domain/ids.js";
import { expectRefused, rpcError, unique, useHarness } from "../support/harness.js";
import { credits, mask, ratelimit } from "../support/proto.js";

const props = (n: number) => Object.fromEntries(Array.from({ length: n }, (_, i) => [`p${i}`, i]));
const nested = (levels: number): Record<string, unknown> => (levels === 0 ? {} : { x: nested(levels - 1) });

describe("IdentityService (errors)", () => {
  const h = useHarness();
  const create = (req: Parameters<ReturnType<typeof h>["admin"]["identities"]["createIdentity"]>[0]) => () =>
    h().admin.identities.createIdentity(req);

  describe("CreateIdentity", () => {
    it("rejects a duplicate external_id as ALREADY_EXISTS", async () => {
      const externalId = unique("dup");
      const { identity } = await h().admin.identities.createIdentity({ externalId, meta: { first: true } });
      await expectRefused(h(), create({ externalId, meta: { second: true } }), Code.AlreadyExists);
      expect(await h().store.getIdentityByExternalId(externalId)).toMatchObject({ id: identity!.id, meta: { first: true } });
    });

    it.each([
      ["empty", ""],
      ["256 characters", "a".repeat(256)],
      ["a space", "user 1"],
      ["a slash", "user/1"],
      ["a non-ASCII letter", "usér"],
      ["a trailing newline", "user\n"],
      ["an operator object as a string", '{"$gt": ""}'],
      ["a $where", "$where"],
    ])("rejects an external_id with %s as INVALID_ARGUMENT", async (_what, externalId) => {
      await expectRefused(h(), create({ externalId }), Code.InvalidArgument, "external_id");
    });

    it("accepts an external_id of exactly 255 characters", async () => {
      const { identity } = await h().admin.identities.createIdentity({ externalId: "a".repeat(255) });
      expect(identity!.externalId).toHaveLength(255);
    });

    it("rejects meta with more than 100 top-level properties", async () => {
      await expectRefused(h(), create({ externalId: unique("m"), meta: props(101) }), Code.InvalidArgument, "meta");
    });

    it("accepts meta with exactly 100 top-level properties", async () => {
      const { identity } = await h().admin.identities.createIdentity({ externalId: unique("m"), meta: props(100) });
      expect(Object.keys(identity!.meta!)).toHaveLength(100);
    });

    it("rejects meta larger than 64 KiB as JSON", async () => {
      await expectRefused(h(), create({ externalId: unique("m"), meta: { blob: "x".repeat(64 * 1024) } }), Code.InvalidArgument, "meta");
    });

    it("rejects meta nested deeper than 32 levels", async () => {
      await expectRefused(h(), create({ externalId: unique("m"), meta: nested(40) as never }), Code.InvalidArgument, "meta");
    });

    it("rejects more than 50 ratelimits", async () => {
      const ratelimits = Array.from({ length: 51 }, (_, i) => ratelimit(`r${i}`, 1, 1));
      await expectRefused(h(), create({ externalId: unique("r"), ratelimits }), Code.InvalidArgument, "ratelimits");
    });

    it("accepts exactly 50 ratelimits", async () => {
      const ratelimits = Array.from({ length: 50 }, (_, i) => ratelimit(`r${i}`, 1, 1));
      const { identity } = await h().admin.identities.createIdentity({ externalId: unique("r"), ratelimits });
      expect(identity!.ratelimits).toHaveLength(50);
    });

    it.each([
      ["an empty name", [ratelimit("", 1, 1)], "ratelimits[0].name"],
      ["a 129-character name", [ratelimit("n".repeat(129), 1, 1)], "ratelimits[0].name"],
      ["a name with a space", [ratelimit("per minute", 1, 1)], "ratelimits[0].name"],
      ["a duplicate name", [ratelimit("a", 1, 1), ratelimit("a", 2, 2)], "ratelimits[1].name"],
      ["a limit of 0", [ratelimit("a", 0, 1)], "ratelimits[0].limit"],
      ["a negative limit", [ratelimit("a", -5, 1)], "ratelimits[0].limit"],
      ["a duration under 1s", [{ name: "a", limit: 1n, duration: { seconds: 0n, nanos: 999_000_000 } }], "ratelimits[0].duration"],
      ["no duration", [{ name: "a", limit: 1n }], "ratelimits[0].duration"],
      ["a duration over 30 days", [ratelimit("a", 1, 31 * 86400)], "ratelimits[0].duration"],
    ])("rejects a ratelimit with %s, naming the field", async (_what, ratelimits, field) => {
      await expectRefused(h(), create({ externalId: unique("r"), ratelimits }), Code.InvalidArgument, field);
    });

    it("accepts a ratelimit name of exactly 128 characters and a duration of exactly 1s", async () => {
      const name = "n".repeat(128);
      const { identity } = await h().admin.identities.createIdentity({ externalId: unique("r"), ratelimits: [ratelimit(name, 1, 1)] });
      expect(identity!.ratelimits[0].name).toBe(name);
    });

    it.each([
      ["negative remaining", { remaining: -1n }, "credits.remaining"],
      ["a refill without interval", { remaining: 1n, refill: { amount: 1n } }, "credits.refill.interval"],
      ["a negative refill amount", { ...credits(1, { interval: "daily", amount: 1 }), refill: { interval: 1, amount: -1n } }, "credits.refill.amount"],
      ["a daily refill with a refill_day", credits(1, { interval: "daily", amount: 1, day: 3 }), "credits.refill.refill_day"],
      ["a monthly refill on day 32", credits(1, { interval: "monthly", amount: 1, day: 32 }), "credits.refill.refill_day"],
    ])("rejects credits with %s, naming the field", async (_what, c, field) => {
      await expectRefused(h(), create({ externalId: unique("c"), credits: c }), Code.InvalidArgument, field);
    });
  });

  describe("GetIdentity", () => {
    it("answers NOT_FOUND for an unknown id and an unknown external_id", async () => {
      expect((await rpcError(h().admin.identities.getIdentity({ lookup: { case: "id", value: newId("id") } }))).code).toBe(Code.NotFound);
      expect((await rpcError(h().admin.identities.getIdentity({ lookup: { case: "externalId", value: unique("nobody") } }))).code).toBe(
        Code.NotFound,
      );
    });

    it("rejects a malformed id, a malformed external_id and a missing lookup as INVALID_ARGUMENT", async () => {
      await expectRefused(h(), () => h().admin.identities.getIdentity({ lookup: { case: "id", value: "id_nope" } }), Code.InvalidArgument, "id");
      await expectRefused(h(), () => h().admin.identities.getIdentity({ lookup: { case: "id", value: "key_01" } }), Code.InvalidArgument, "id");
      await expectRefused(
        h(),
        () => h().admin.identities.getIdentity({ lookup: { case: "externalId", value: "$where" } }),
        Code.InvalidArgument,
        "external_id",
      );
      await expectRefused(h(), () => h().admin.identities.getIdentity({}), Code.InvalidArgument, "id");
    });
  });

  describe("ListIdentities", () => {
    it.each([101, -1])("rejects page_size %i as INVALID_ARGUMENT", async (pageSize) => {
      await expectRefused(h(), () => h().admin.identities.listIdentities({ pageSize }), Code.InvalidArgument, "page_size");
    });

    it("accepts page_size 100", async () => {
      await h().admin.identities.createIdentity({ externalId: unique("x") });
      expect((await h().admin.identities.listIdentities({ pageSize: 100 })).identities).toHaveLength(1);
    });

    it("rejects a page_token issued for another search", async () => {
      for (let i = 0; i < 3; i++) await h().admin.identities.createIdentity({ externalId: `team-${i}` });
      const first = await h().admin.identities.listIdentities({ pageSize: 1, search: "team" });
      expect(first.nextPageToken).not.toBe("");
      await expectRefused(
        h(),
        () => h().admin.identities.listIdentities({ pageSize: 1, search: "team-", pageToken: first.nextPageToken }),
        Code.InvalidArgument,
        "page_token",
      );
    });

    it("rejects a page_token issued by ListKeys", async () => {
      for (let i = 0; i < 2; i++) await h().admin.keys.createKey({ apiId: "api1" });
      const keys = await h().admin.keys.listKeys({ apiId: "api1", pageSize: 1 });
      await expectRefused(
        h(),
        () => h().admin.identities.listIdentities({ pageToken: keys.nextPageToken }),
        Code.InvalidArgument,
        "page_token",
      );
    });

    it.each([
      ["garbage", "not-a-token"],
      ["base64 of an operator", Buffer.from(JSON.stringify({ a: { $gt: "" }, q: "x" })).toString("base64url")],
      ["too long", "A".repeat(600)],
    ])("rejects a %s page_token", async (_what, pageToken) => {
      await expectRefused(h(), () => h().admin.identities.listIdentities({ pageToken }), Code.InvalidArgument, "page_token");
    });

    it("rejects a search longer than 255 characters", async () => {
      await expectRefused(h(), () => h().admin.identities.listIdentities({ search: "s".repeat(256) }), Code.InvalidArgument, "search");
    });
  });

  describe("UpdateIdentity", () => {
    async function existing() {
      return (
        await h().admin.identities.createIdentity({ externalId: unique("user"), meta: { keep: 1 }, ratelimits: [ratelimit("rpm", 1, 60)] })
      ).identity!;
    }

    it("rejects a missing update_mask", async () => {
      const identity = await existing();
      await expectRefused(h(), () => h().admin.identities.updateIdentity({ identity: { id: identity.id, meta: {} } }), Code.InvalidArgument, "update_mask");
    });

    it.each(["id", "created_at", "updated_at", "metadata", "meta.plan", ""])("rejects the unknown update_mask path %j", async (path) => {
      const identity = await existing();
      await expectRefused(
        h(),
        () => h().admin.identities.updateIdentity({ identity: { id: identity.id, meta: {} }, updateMask: mask("meta", path) }),
        Code.InvalidArgument,
        "update_mask",
      );
    });

    it("rejects a request without an identity", async () => {
      await expectRefused(h(), () => h().admin.identities.updateIdentity({ updateMask: mask("meta") }), Code.InvalidArgument, "identity");
    });

    it("answers NOT_FOUND for an unknown identity and INVALID_ARGUMENT for a malformed id", async () => {
      await expectRefused(
        h(),
        () => h().admin.identities.updateIdentity({ identity: { id: newId("id") }, updateMask: mask("meta") }),
        Code.NotFound,
      );
      await expectRefused(
        h(),
        () => h().admin.identities.updateIdentity({ identity: { id: "nope" }, updateMask: mask("meta") }),
        Code.InvalidArgument,
        "identity.id",
      );
    });

    it("rejects a rename to a taken external_id as ALREADY_EXISTS", async () => {
      const a = await existing();
      const b = await existing();
      await expectRefused(
        h(),
        () => h().admin.identities.updateIdentity({ identity: { id: b.id, externalId: a.externalId }, updateMask: mask("external_id") }),
        Code.AlreadyExists,
      );
    });

    it.each([
      ["clearing external_id", { externalId: "" }, mask("external_id"), "identity.external_id"],
      ["an external_id with $", { externalId: "$ne" }, mask("external_id"), "identity.external_id"],
      ["meta over 100 properties", { meta: props(101) }, mask("meta"), "identity.meta"],
      ["meta over 64 KiB", { meta: { b: "x".repeat(70_000) } }, mask("meta"), "identity.meta"],
      ["51 ratelimits", { ratelimits: Array.from({ length: 51 }, (_, i) => ratelimit(`r${i}`, 1, 1)) }, mask("ratelimits"), "identity.ratelimits"],
      ["a duration under 1s", { ratelimits: [{ name: "a", limit: 1n, duration: { nanos: 500_000_000 } }] }, mask("ratelimits"), "identity.ratelimits[0].duration"],
      ["negative credits", { credits: { remaining: -3n } }, mask("credits"), "identity.credits.remaining"],
    ])("rejects %s, naming the field, and changes nothing", async (_what, fields, updateMask, field) => {
      const identity = await existing();
      await expectRefused(
        h(),
        () => h().admin.identities.updateIdentity({ identity: { id: identity.id, ...fields }, updateMask }),
        Code.InvalidArgument,
        field,
      );
    });

    it("changes nothing when one field of several is invalid", async () => {
      const identity = await existing();
      await expectRefused(
        h(),
        () =>
          h().admin.identities.updateIdentity({
            identity: { id: identity.id, meta: { changed: true }, ratelimits: [ratelimit("", 1, 1)] },
            updateMask: mask("meta", "ratelimits"),
          }),
        Code.InvalidArgument,
        "identity.ratelimits[0].name",
      );
    });
  });

  describe("DeleteIdentity", () => {
    it("answers NOT_FOUND for an unknown identity, and INVALID_ARGUMENT without a lookup", async () => {
      await expectRefused(h(), () => h().admin.identities.deleteIdentity({ lookup: { case: "id", value: newId("id") } }), Code.NotFound);
      await expectRefused(h(), () => h().admin.identities.deleteIdentity({ lookup: { case: "externalId", value: unique("x") } }), Code.NotFound);
      await expectRefused(h(), () => h().admin.identities.deleteIdentity({ deleteKeys: true }), Code.InvalidArgument, "id");
    });
  });

  describe("hostile input", () => {
    it("never treats an operator-shaped external_id as a query", async () => {
      await h().admin.identities.createIdentity({ externalId: unique("victim") });
      for (const externalId of ['{"$gt": ""}', '{"$ne": null}', "$where", "this.a == 1 || true"]) {
        const err = await rpcError(h().admin.identities.getIdentity({ lookup: { case: "externalId", value: externalId } }));
        expect(err.code).toBe(Code.InvalidArgument);
        const del = await rpcError(h().admin.identities.deleteIdentity({ lookup: { case: "externalId", value: externalId }, deleteKeys: true }));
        expect(del.code).toBe(Code.InvalidArgument);
      }
      expect((await h().snapshot()).identities).toHaveLength(1);
    });

    it("treats an operator-shaped search as text that matches nothing", async () => {
      await h().admin.identities.createIdentity({ externalId: unique("victim") });
      for (const search of ['{"$gt": ""}', "$where", ".*", ".", "[a-z]", "\\", "(", "%", "_"]) {
        const res = await h().admin.identities.listIdentities({ search });
        expect(res.identities.map((i) => i.externalId), `search ${search}`).toEqual([]);
      }
    });

    it("stores meta with dotted and $-prefixed keys as data, unchanged", async () => {
      const meta = {
        "a.b": 1,
        $gt: "",
        $where: "function() { return true }",
        nested: { $set: { "x.y": true }, list: [{ $in: [1, 2] }, "$$ROOT"] },
        "": "empty key",
        "__proto__x": "not a prototype",
      };
      const { identity } = await h().admin.identities.createIdentity({ externalId: unique("meta"), meta });
      expect(identity!.meta).toEqual(meta);
      expect((await h().admin.identities.getIdentity({ lookup: { case: "id", value: identity!.id } })).identity!.meta).toEqual(meta);
      expect((await h().admin.identities.listIdentities({})).identities[0].meta).toEqual(meta);
      expect((await h().store.getIdentity(identity!.id))!.meta).toEqual(meta);

      const { identity: updated } = await h().admin.identities.updateIdentity({
        identity: { id: identity!.id, meta: { ...meta, "$unset": { "a.b": "" } } },
        updateMask: mask("meta"),
      });
      expect(updated!.meta).toEqual({ ...meta, $unset: { "a.b": "" } });
      expect(updated!.externalId).toBe(identity!.externalId);
    });
  });
});
