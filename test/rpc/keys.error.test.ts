import { Code } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { CreditsOperation } from "../../gen/latchkey/v1/key_service_pb.js";
import { newId } from "../../src/domain/ids.js";
import { expectRefused, rpcError, unique, useHarness } from "../support/harness.js";
import { at, credits, mask, ratelimit } from "../support/proto.js";

const props = (n: number) => Object.fromEntries(Array.from({ length: n }, (_, i) => [`p${i}`, i]));

describe("KeyService (errors)", () => {
  const h = useHarness();
  type CreateReq = Parameters<ReturnType<typeof h>["admin"]["keys"]["createKey"]>[0];
  const create = (req: CreateReq) => () => h().admin.keys.createKey(req);

  describe("CreateKey", () => {
    it.each([
      ["empty", ""],
      ["starting with a dash", "-api"],
      ["with a space", "my api"],
      ["65 characters", "a".repeat(65)],
      ["an operator object", '{"$gt": ""}'],
      ["a $where", "$where"],
    ])("rejects an api_id %s as INVALID_ARGUMENT", async (_what, apiId) => {
      await expectRefused(h(), create({ apiId }), Code.InvalidArgument, "api_id");
    });

    it("accepts an api_id of 64 characters with . _ -", async () => {
      const apiId = "A1._-" + "a".repeat(59);
      expect((await h().admin.keys.createKey({ apiId })).key!.apiId).toBe(apiId);
    });

    it.each([
      ["starting with a digit", "1sk"],
      ["with an underscore", "sk_live"],
      ["with a dash", "sk-live"],
      ["17 characters", "a".repeat(17)],
      ["non-ASCII", "clé"],
    ])("rejects a prefix %s", async (_what, prefix) => {
      await expectRefused(h(), create({ apiId: "api1", prefix }), Code.InvalidArgument, "prefix");
    });

    it.each([15, 65, -1])("rejects byte_length %i", async (byteLength) => {
      await expectRefused(h(), create({ apiId: "api1", byteLength }), Code.InvalidArgument, "byte_length");
    });

    it.each([
      ["256 characters", "n".repeat(256)],
      ["a control character", "bad\u0000name"],
    ])("rejects a name with %s", async (_what, name) => {
      await expectRefused(h(), create({ apiId: "api1", name }), Code.InvalidArgument, "name");
    });

    it.each([
      ["more than 100 top-level properties", { meta: props(101) }, "meta"],
      ["meta over 64 KiB", { meta: { blob: "x".repeat(65 * 1024) } }, "meta"],
      ["more than 50 ratelimits", { ratelimits: Array.from({ length: 51 }, (_, i) => ratelimit(`r${i}`, 1, 1)) }, "ratelimits"],
      ["an empty ratelimit name", { ratelimits: [ratelimit("", 1, 1)] }, "ratelimits[0].name"],
      ["a 129-character ratelimit name", { ratelimits: [ratelimit("r".repeat(129), 1, 1)] }, "ratelimits[0].name"],
      ["a ratelimit duration under 1s", { ratelimits: [{ name: "r", limit: 1n, duration: { nanos: 10_000_000 } }] }, "ratelimits[0].duration"],
      ["a ratelimit limit of 0", { ratelimits: [ratelimit("r", 0, 1)] }, "ratelimits[0].limit"],
      ["a permission with a space", { permissions: ["ok", "not ok"] }, "permissions[1]"],
      ["a $-permission", { permissions: ["$where"] }, "permissions[0]"],
      ["more than 100 permissions", { permissions: Array.from({ length: 101 }, (_, i) => `p${i}`) }, "permissions"],
      ["negative credits", { credits: { remaining: -1n } }, "credits.remaining"],
      ["credits past 2^53", { credits: { remaining: 2n ** 60n } }, "credits.remaining"],
      ["an expiry in the past", { expiresAt: at(Date.now() - 1000) }, "expires_at"],
    ])("rejects %s, naming the field", async (_what, fields, field) => {
      await expectRefused(h(), create({ apiId: "api1", ...fields }), Code.InvalidArgument, field);
    });

    it("rejects a bad external_id without creating an identity", async () => {
      await expectRefused(h(), create({ apiId: "api1", identity: { case: "externalId", value: "bad id" } }), Code.InvalidArgument, "external_id");
    });

    it("creates no identity when any other field of a key for a new external_id is invalid", async () => {
      const externalId = unique("new");
      await expectRefused(
        h(),
        create({ apiId: "api1", meta: props(101), identity: { case: "externalId", value: externalId } }),
        Code.InvalidArgument,
        "meta",
      );
      expect(await h().store.getIdentityByExternalId(externalId)).toBeNull();
    });

    it("rejects a malformed identity_id, and answers NOT_FOUND for an unknown one", async () => {
      await expectRefused(h(), create({ apiId: "api1", identity: { case: "identityId", value: "id_x" } }), Code.InvalidArgument, "identity_id");
      await expectRefused(h(), create({ apiId: "api1", identity: { case: "identityId", value: newId("id") } }), Code.NotFound);
    });
  });

  describe("GetKey", () => {
    it("answers NOT_FOUND for an unknown key and INVALID_ARGUMENT for a malformed id", async () => {
      await expectRefused(h(), () => h().admin.keys.getKey({ id: newId("key") }), Code.NotFound);
      await expectRefused(h(), () => h().admin.keys.getKey({ id: newId("id") }), Code.InvalidArgument, "id");
      await expectRefused(h(), () => h().admin.keys.getKey({ id: "" }), Code.InvalidArgument, "id");
    });

    it("answers NOT_FOUND for a deleted key", async () => {
      const { key } = await h().admin.keys.createKey({ apiId: "api1" });
      await h().admin.keys.deleteKey({ id: key!.id });
      await expectRefused(h(), () => h().admin.keys.getKey({ id: key!.id }), Code.NotFound);
    });
  });

  describe("ListKeys", () => {
    it.each([
      ["page_size 101", { pageSize: 101 }, "page_size"],
      ["a negative page_size", { pageSize: -5 }, "page_size"],
      ["a bad api_id", { apiId: "a b" }, "api_id"],
      ["a malformed identity_id", { identityId: "id_1" }, "identity_id"],
      ["a bad external_id", { externalId: '{"$gt": ""}' }, "external_id"],
      ["a garbage page_token", { pageToken: "%%%" }, "page_token"],
    ])("rejects %s", async (_what, req, field) => {
      await expectRefused(h(), () => h().admin.keys.listKeys(req), Code.InvalidArgument, field);
    });

    it("rejects a page_token issued for another api", async () => {
      for (let i = 0; i < 2; i++) await h().admin.keys.createKey({ apiId: "api_a" });
      await h().admin.keys.createKey({ apiId: "api_b" });
      const first = await h().admin.keys.listKeys({ apiId: "api_a", pageSize: 1 });
      expect(first.nextPageToken).not.toBe("");
      await expectRefused(
        h(),
        () => h().admin.keys.listKeys({ apiId: "api_b", pageSize: 1, pageToken: first.nextPageToken }),
        Code.InvalidArgument,
        "page_token",
      );
      await expectRefused(h(), () => h().admin.keys.listKeys({ pageSize: 1, pageToken: first.nextPageToken }), Code.InvalidArgument, "page_token");
    });

    it("rejects a page_token issued by ListIdentities", async () => {
      for (let i = 0; i < 2; i++) await h().admin.identities.createIdentity({ externalId: unique("i") });
      const ids = await h().admin.identities.listIdentities({ pageSize: 1 });
      await expectRefused(h(), () => h().admin.keys.listKeys({ pageToken: ids.nextPageToken }), Code.InvalidArgument, "page_token");
    });
  });

  describe("UpdateKey", () => {
    const existing = async () => (await h().admin.keys.createKey({ apiId: "api1", name: "orig", meta: { a: 1 } })).key!;

    it("rejects a missing update_mask", async () => {
      const key = await existing();
      await expectRefused(h(), () => h().admin.keys.updateKey({ key: { id: key.id, name: "x" } }), Code.InvalidArgument, "update_mask");
    });

    it.each(["id", "api_id", "start", "hash", "plaintext", "created_at", "last_used_at", "meta.a"])(
      "rejects the update_mask path %j",
      async (path) => {
        const key = await existing();
        await expectRefused(
          h(),
          () => h().admin.keys.updateKey({ key: { id: key.id, apiId: "other" }, updateMask: mask(path) }),
          Code.InvalidArgument,
          "update_mask",
        );
      },
    );

    it("rejects identity_id and external_id in one mask", async () => {
      const key = await existing();
      await expectRefused(
        h(),
        () => h().admin.keys.updateKey({ key: { id: key.id, externalId: unique("u") }, updateMask: mask("identity_id", "external_id") }),
        Code.InvalidArgument,
        "update_mask",
      );
    });

    it("rejects a request without a key, a malformed id, and answers NOT_FOUND for an unknown key", async () => {
      await expectRefused(h(), () => h().admin.keys.updateKey({ updateMask: mask("name") }), Code.InvalidArgument, "key");
      await expectRefused(h(), () => h().admin.keys.updateKey({ key: { id: "key_1" }, updateMask: mask("name") }), Code.InvalidArgument, "key.id");
      await expectRefused(h(), () => h().admin.keys.updateKey({ key: { id: newId("key") }, updateMask: mask("name") }), Code.NotFound);
    });

    it.each([
      ["a 256-character name", { name: "n".repeat(256) }, mask("name"), "key.name"],
      ["meta over 100 properties", { meta: props(101) }, mask("meta"), "key.meta"],
      ["meta over 64 KiB", { meta: { b: "x".repeat(70_000) } }, mask("meta"), "key.meta"],
      ["51 ratelimits", { ratelimits: Array.from({ length: 51 }, (_, i) => ratelimit(`r${i}`, 1, 1)) }, mask("ratelimits"), "key.ratelimits"],
      ["a duration under 1s", { ratelimits: [{ name: "r", limit: 1n, duration: { nanos: 1 } }] }, mask("ratelimits"), "key.ratelimits[0].duration"],
      ["a bad permission", { permissions: ["a b"] }, mask("permissions"), "key.permissions[0]"],
      ["negative credits", { credits: { remaining: -1n } }, mask("credits"), "key.credits.remaining"],
      ["a bad external_id", { externalId: "a b" }, mask("external_id"), "key.external_id"],
      ["a malformed identity_id", { identityId: "nope" }, mask("identity_id"), "key.identity_id"],
    ])("rejects %s, naming the field, and changes nothing", async (_what, fields, updateMask, field) => {
      const key = await existing();
      await expectRefused(h(), () => h().admin.keys.updateKey({ key: { id: key.id, ...fields }, updateMask }), Code.InvalidArgument, field);
    });

    it("answers NOT_FOUND for attaching an unknown identity, and changes nothing", async () => {
      const key = await existing();
      await expectRefused(
        h(),
        () => h().admin.keys.updateKey({ key: { id: key.id, identityId: newId("id") }, updateMask: mask("identity_id") }),
        Code.NotFound,
      );
    });

    it("creates no identity when moving to a new external_id fails validation", async () => {
      const key = await existing();
      const externalId = unique("new");
      await expectRefused(
        h(),
        () => h().admin.keys.updateKey({ key: { id: key.id, externalId, meta: props(101) }, updateMask: mask("external_id", "meta") }),
        Code.InvalidArgument,
        "key.meta",
      );
      expect(await h().store.getIdentityByExternalId(externalId)).toBeNull();
    });
  });

  describe("DeleteKey", () => {
    it("answers NOT_FOUND for an unknown or already deleted key, INVALID_ARGUMENT for a malformed id", async () => {
      const { key } = await h().admin.keys.createKey({ apiId: "api1" });
      await h().admin.keys.deleteKey({ id: key!.id });
      await expectRefused(h(), () => h().admin.keys.deleteKey({ id: key!.id }), Code.NotFound);
      await expectRefused(h(), () => h().admin.keys.deleteKey({ id: newId("key") }), Code.NotFound);
      await expectRefused(h(), () => h().admin.keys.deleteKey({ id: '{"$gt": ""}' }), Code.InvalidArgument, "id");
    });
  });

  describe("RerollKey", () => {
    it("answers NOT_FOUND for an unknown key", async () => {
      await expectRefused(h(), () => h().admin.keys.rerollKey({ id: newId("key") }), Code.NotFound);
    });

    it.each([
      ["negative", { seconds: -1n }],
      ["over 30 days", { seconds: 31n * 86_400n }],
    ])("rejects a %s grace_period", async (_what, gracePeriod) => {
      const { key } = await h().admin.keys.createKey({ apiId: "api1" });
      await expectRefused(h(), () => h().admin.keys.rerollKey({ id: key!.id, gracePeriod }), Code.InvalidArgument, "grace_period");
    });
  });

  describe("UpdateCredits", () => {
    it("rejects a request without target, without operation, or without the value an operation needs", async () => {
      const { key } = await h().admin.keys.createKey({ apiId: "api1", credits: credits(5) });
      const target = { case: "keyId" as const, value: key!.id };
      await expectRefused(h(), () => h().admin.keys.updateCredits({ operation: CreditsOperation.SET, value: 1n }), Code.InvalidArgument, "key_id");
      await expectRefused(h(), () => h().admin.keys.updateCredits({ target, value: 1n }), Code.InvalidArgument, "operation");
      await expectRefused(h(), () => h().admin.keys.updateCredits({ target, operation: CreditsOperation.INCREMENT }), Code.InvalidArgument, "value");
      await expectRefused(h(), () => h().admin.keys.updateCredits({ target, operation: CreditsOperation.DECREMENT }), Code.InvalidArgument, "value");
      await expectRefused(
        h(),
        () => h().admin.keys.updateCredits({ target, operation: CreditsOperation.SET, value: -1n }),
        Code.InvalidArgument,
        "value",
      );
    });

    it("refuses to increment or decrement an unlimited balance as FAILED_PRECONDITION", async () => {
      const { key } = await h().admin.keys.createKey({ apiId: "api1" });
      const { identity } = await h().admin.identities.createIdentity({ externalId: unique("u") });
      for (const target of [
        { case: "keyId" as const, value: key!.id },
        { case: "identityId" as const, value: identity!.id },
      ]) {
        for (const operation of [CreditsOperation.INCREMENT, CreditsOperation.DECREMENT]) {
          await expectRefused(h(), () => h().admin.keys.updateCredits({ target, operation, value: 1n }), Code.FailedPrecondition);
        }
      }
    });

    it("answers NOT_FOUND for an unknown key or identity, INVALID_ARGUMENT for malformed ids", async () => {
      const set = { operation: CreditsOperation.SET, value: 1n };
      await expectRefused(h(), () => h().admin.keys.updateCredits({ target: { case: "keyId", value: newId("key") }, ...set }), Code.NotFound);
      await expectRefused(h(), () => h().admin.keys.updateCredits({ target: { case: "identityId", value: newId("id") }, ...set }), Code.NotFound);
      await expectRefused(
        h(),
        () => h().admin.keys.updateCredits({ target: { case: "keyId", value: newId("id") }, ...set }),
        Code.InvalidArgument,
        "key_id",
      );
      await expectRefused(
        h(),
        () => h().admin.keys.updateCredits({ target: { case: "identityId", value: "$where" }, ...set }),
        Code.InvalidArgument,
        "identity_id",
      );
    });
  });

  describe("hostile input", () => {
    it("stores key meta with dotted and $-prefixed keys as data, unchanged", async () => {
      const meta = { "a.b": { "c.d": 1 }, $gt: "", $where: "sleep(100)", $set: { enabled: false }, list: [{ $in: ["x"] }] };
      const { key } = await h().admin.keys.createKey({ apiId: "api1", meta });
      expect(key!.meta).toEqual(meta);
      expect(key!.enabled).toBe(true);
      expect((await h().admin.keys.getKey({ id: key!.id })).key!.meta).toEqual(meta);
      expect((await h().admin.keys.listKeys({ apiId: "api1" })).keys[0].meta).toEqual(meta);
      expect((await h().store.getKey(key!.id))!.meta).toEqual(meta);
      const { key: updated } = await h().admin.keys.updateKey({ key: { id: key!.id, meta: { $rename: { "a.b": "x" } } }, updateMask: mask("meta") });
      expect(updated!.meta).toEqual({ $rename: { "a.b": "x" } });
      expect(updated!.name).toBe(key!.name);
    });

    it("never lists or links across keys through operator-shaped filters", async () => {
      await h().admin.keys.createKey({ apiId: "api1", identity: { case: "externalId", value: unique("victim") } });
      for (const externalId of ['{"$gt": ""}', '{"$ne": null}', "$where"]) {
        expect((await rpcError(h().admin.keys.listKeys({ externalId }))).code).toBe(Code.InvalidArgument);
        expect((await rpcError(h().admin.keys.createKey({ apiId: "api1", identity: { case: "externalId", value: externalId } }))).code).toBe(
          Code.InvalidArgument,
        );
      }
      expect((await rpcError(h().admin.keys.listKeys({ apiId: '{"$ne": ""}' }))).code).toBe(Code.InvalidArgument);
      const snap = await h().snapshot();
      expect(snap.keys).toHaveLength(1);
      expect(snap.identities).toHaveLength(1);
    });
  });
});
