import { randomBytes } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AlreadyExistsError, FailedPreconditionError } from "../../src/domain/errors.js";
import { newId } from "../../src/domain/ids.js";
import { hashKey } from "../../src/domain/key-format.js";
import type { IdentityRecord, KeyRecord, RootKeyRecord } from "../../src/domain/types.js";
import type { MongoStoreOptions } from "../../src/storage/mongodb/mongo-store.js";
import type { Store } from "../../src/storage/store.js";
import { mongoUri, openTestStore, unique, type StoreKind, type TestStore } from "../support/harness.js";
import { identityRecord, keyRecord } from "../support/records.js";

/*
 * One contract, every store. Each suite shares one store (one temp dir, or one
 * random MongoDB database dropped afterwards); each test creates its own data
 * under random names, so tests never see each other's records.
 */

const HOSTILE_META = {
  "a.b": 1,
  $gt: "",
  $where: "sleep(1000)",
  nested: { "$set": { "x.y": true }, "arr": [{ "$in": [1] }] },
  "": "empty key",
};

const identity = (over: Partial<IdentityRecord> = {}): IdentityRecord => identityRecord(over);
const key = (over: Partial<KeyRecord> = {}): KeyRecord => keyRecord(over).record;

function rootKey(): RootKeyRecord {
  const t = Date.now();
  return { id: newId("root", t), name: "bootstrap", hash: hashKey(randomBytes(16).toString("hex")), start: "lkroot_x", permissions: [{ action: "read", apiId: null }], createdAt: t };
}

async function thrown(p: Promise<unknown>): Promise<unknown> {
  try {
    await p;
  } catch (err) {
    return err;
  }
  throw new Error("expected a rejection");
}

/**
 * The MongoDB store runs in both key layouts (src/storage/mongodb/key-layout.ts),
 * whichever server this is: "indexed" is MongoDB proper's, "bucketed" FerretDB's.
 */
const VARIANTS: { name: string; kind: StoreKind; mongo?: Partial<MongoStoreOptions> }[] = [
  { name: "embedded", kind: "embedded" },
  { name: "mongodb (indexed key layout)", kind: "mongodb", mongo: { layout: "indexed" } },
  { name: "mongodb (bucketed key layout)", kind: "mongodb", mongo: { layout: "bucketed" } },
];

describe.each(VARIANTS)("$name store contract", ({ kind, mongo }) => {
  if (kind === "mongodb" && !mongoUri()) {
    if (process.env.CI) {
      it("runs in CI", () => {
        throw new Error("MONGODB_URI is not set, but CI is: the MongoDB store contract must run in CI");
      });
    } else {
      it.skip("needs MONGODB_URI (e.g. MONGODB_URI=mongodb://127.0.0.1:27017); skipped outside CI", () => {});
    }
    return;
  }

  let ts: TestStore;
  const store = (): Store => ts.store;
  beforeAll(async () => {
    ts = await openTestStore(kind, { mongo });
  });
  afterAll(async () => {
    await ts?.destroy();
  });

  describe("identities", () => {
    it("stores an identity and reads it back by id and by external_id", async () => {
      const rec = identity({
        meta: HOSTILE_META,
        ratelimits: [{ name: "rpm", limit: 10, durationMs: 60_000, autoApply: true }],
        credits: { remaining: 5, refill: { interval: "monthly", amount: 100, refillDay: 31, lastRefillAt: 1 } },
      });
      await store().createIdentity(rec);
      expect(await store().getIdentity(rec.id)).toEqual(rec);
      expect(await store().getIdentityByExternalId(rec.externalId)).toEqual(rec);
      expect(await store().getIdentities([rec.id, newId("id")])).toEqual([rec]);
    });

    it("answers null for an unknown id or external_id", async () => {
      expect(await store().getIdentity(newId("id"))).toBeNull();
      expect(await store().getIdentityByExternalId(unique("nobody"))).toBeNull();
    });

    it("treats an operator-shaped external_id as a plain string", async () => {
      await store().createIdentity(identity());
      expect(await store().getIdentityByExternalId('{"$gt": ""}')).toBeNull();
      expect(await store().getIdentityByExternalId("$where")).toBeNull();
    });

    it("enforces a unique external_id in the database", async () => {
      const first = identity();
      await store().createIdentity(first);
      const err = await thrown(store().createIdentity(identity({ externalId: first.externalId })));
      expect(err).toBeInstanceOf(AlreadyExistsError);
      expect(await store().getIdentityByExternalId(first.externalId)).toEqual(first);
    });

    it("refuses to rename an identity to a taken external_id", async () => {
      const a = identity();
      const b = identity();
      await store().createIdentity(a);
      await store().createIdentity(b);
      const err = await thrown(store().updateIdentity(b.id, { externalId: a.externalId }, Date.now()));
      expect(err).toBeInstanceOf(AlreadyExistsError);
      expect(await store().getIdentity(b.id)).toEqual(b);
    });

    it("updates only the patched fields and bumps updatedAt", async () => {
      const rec = identity({ meta: { keep: 1 }, credits: { remaining: 3, refill: null } });
      await store().createIdentity(rec);
      const renamed = unique("renamed");
      const updated = await store().updateIdentity(rec.id, { externalId: renamed, meta: HOSTILE_META }, rec.updatedAt + 10);
      expect(updated).toEqual({ ...rec, externalId: renamed, meta: HOSTILE_META, updatedAt: rec.updatedAt + 10, version: 1 });
      expect(await store().getIdentity(rec.id)).toEqual(updated);
      expect(await store().getIdentityByExternalId(rec.externalId)).toBeNull();
      expect(await store().updateIdentity(newId("id"), { meta: {} }, Date.now())).toBeNull();
    });

    it("creates exactly one identity when 20 ensureIdentity calls race", async () => {
      const externalId = unique("race");
      const results = await Promise.all(Array.from({ length: 20 }, () => store().ensureIdentity(identity({ externalId }))));
      const ids = new Set(results.map((r) => r.identity.id));
      expect(ids.size).toBe(1);
      expect(results.filter((r) => r.created)).toHaveLength(1);
      const stored = await store().getIdentityByExternalId(externalId);
      expect(stored?.id).toBe([...ids][0]);
      expect(await store().listIdentities({ limit: 100, afterId: null }, externalId)).toHaveLength(1);
    });

    it("returns the existing identity from ensureIdentity without changing it", async () => {
      const rec = identity({ meta: { plan: "pro" } });
      await store().createIdentity(rec);
      const res = await store().ensureIdentity(identity({ externalId: rec.externalId }));
      expect(res).toEqual({ identity: rec, created: false });
    });
  });

  describe("listing identities", () => {
    it("pages through identities in id order without gaps or repeats", async () => {
      const tag = unique("page");
      const created: IdentityRecord[] = [];
      for (let i = 0; i < 5; i++) {
        const rec = identity({ externalId: `${tag}-${i}` });
        await store().createIdentity(rec);
        created.push(rec);
      }
      const seen: string[] = [];
      let afterId: string | null = null;
      const sizes: number[] = [];
      for (;;) {
        const page: IdentityRecord[] = await store().listIdentities({ limit: 2, afterId }, tag);
        sizes.push(page.length);
        if (page.length === 0) break;
        seen.push(...page.map((r) => r.id));
        afterId = page[page.length - 1].id;
      }
      expect(sizes).toEqual([2, 2, 1, 0]);
      expect(seen).toEqual(created.map((r) => r.id).sort());
    });

    it("searches external ids by case-insensitive substring", async () => {
      const tag = unique("Case").toUpperCase();
      const hit = identity({ externalId: `user_${tag}_x` });
      await store().createIdentity(hit);
      await store().createIdentity(identity());
      const found = await store().listIdentities({ limit: 100, afterId: null }, tag.toLowerCase());
      expect(found.map((r) => r.id)).toEqual([hit.id]);
    });

    it("takes regex metacharacters in a search literally", async () => {
      const tag = unique("meta");
      const dotted = identity({ externalId: `${tag}.x` });
      const plain = identity({ externalId: `${tag}Ax` });
      const piped = identity({ externalId: `auth0|${tag}` });
      for (const r of [dotted, plain, piped]) await store().createIdentity(r);
      const search = async (s: string) => (await store().listIdentities({ limit: 100, afterId: null }, s)).map((r) => r.id);

      expect(await search(`${tag}.`)).toEqual([dotted.id]);
      expect(await search(`${tag}.*`)).toEqual([]);
      expect(await search(".*")).toEqual([]);
      expect(await search("$")).toEqual([]);
      expect(await search("^")).toEqual([]);
      expect(await search(`|${tag}`)).toEqual([piped.id]);
      expect(await search(`${tag}|zzz`)).toEqual([]);
      expect(await search(`[${tag[0]}]`)).toEqual([]);
    });
  });

  describe("deleting identities", () => {
    it("deletes an identity without keys", async () => {
      const rec = identity();
      await store().createIdentity(rec);
      expect(await store().deleteIdentity(rec.id, false)).toEqual({ deletedKeys: 0, unlinkedKeys: 0 });
      expect(await store().getIdentity(rec.id)).toBeNull();
      expect(await store().getIdentityByExternalId(rec.externalId)).toBeNull();
    });

    it("unlinks, and keeps, the keys of a deleted identity", async () => {
      const rec = identity();
      await store().createIdentity(rec);
      const k1 = key({ identityId: rec.id });
      const k2 = key({ identityId: rec.id });
      const other = key();
      for (const k of [k1, k2, other]) await store().createKey(k);
      expect(await store().deleteIdentity(rec.id, false)).toEqual({ deletedKeys: 0, unlinkedKeys: 2 });
      for (const k of [k1, k2]) {
        const stored = await store().getKey(k.id);
        expect(stored).toMatchObject({ id: k.id, identityId: null, hash: k.hash });
        expect((await store().getKeyByHash(k.hash))?.id).toBe(k.id);
      }
      expect(await store().getKey(other.id)).toEqual(other);
      expect(await store().getIdentity(rec.id)).toBeNull();
    });

    it("deletes the keys too when asked", async () => {
      const rec = identity();
      await store().createIdentity(rec);
      const k1 = key({ identityId: rec.id });
      const other = key();
      await store().createKey(k1);
      await store().createKey(other);
      expect(await store().deleteIdentity(rec.id, true)).toEqual({ deletedKeys: 1, unlinkedKeys: 0 });
      expect(await store().getKey(k1.id)).toBeNull();
      expect(await store().getKeyByHash(k1.hash)).toBeNull();
      expect(await store().getKey(other.id)).toEqual(other);
    });

    it("answers null for an unknown identity", async () => {
      expect(await store().deleteIdentity(newId("id"), true)).toBeNull();
    });
  });

  describe("keys", () => {
    it("stores a key and reads it back by id and by hash, meta unchanged", async () => {
      const k = key({
        meta: HOSTILE_META,
        expiresAt: Date.now() + 60_000,
        credits: { remaining: 7, refill: { interval: "daily", amount: 10, refillDay: null, lastRefillAt: 5 } },
        ratelimits: [{ name: "rps", limit: 1, durationMs: 1000, autoApply: false }],
        permissions: ["a.read", "b/*"],
      });
      await store().createKey(k);
      expect(await store().getKey(k.id)).toEqual(k);
      expect(await store().getKeyByHash(k.hash)).toEqual(k);
    });

    it("enforces a unique key hash in the database", async () => {
      const k = key();
      await store().createKey(k);
      const err = await thrown(store().createKey(key({ hash: k.hash })));
      expect(err).toBeInstanceOf(AlreadyExistsError);
      expect(await store().getKeyByHash(k.hash)).toEqual(k);
    });

    it("lists keys by api and by identity, paged in id order", async () => {
      const apiId = unique("api");
      const rec = identity();
      await store().createIdentity(rec);
      const keys: KeyRecord[] = [];
      for (let i = 0; i < 5; i++) {
        const k = key({ apiId, identityId: i % 2 === 0 ? rec.id : null });
        await store().createKey(k);
        keys.push(k);
      }
      await store().createKey(key({ identityId: rec.id })); // another api
      const all = async (filter: { apiId?: string; identityId?: string }) => {
        const ids: string[] = [];
        let afterId: string | null = null;
        for (;;) {
          const page: KeyRecord[] = await store().listKeys(filter, { limit: 2, afterId });
          expect(page.length).toBeLessThanOrEqual(2);
          if (page.length === 0) return ids;
          ids.push(...page.map((k) => k.id));
          afterId = page[page.length - 1].id;
        }
      };
      const sorted = (ks: KeyRecord[]) => ks.map((k) => k.id).sort();
      expect(await all({ apiId })).toEqual(sorted(keys));
      expect(await all({ apiId, identityId: rec.id })).toEqual(sorted(keys.filter((k) => k.identityId === rec.id)));
      expect(await all({ identityId: rec.id })).toHaveLength(4);
    });

    it("updates a key's patched fields, and answers null for an unknown key", async () => {
      const k = key({ name: "before" });
      await store().createKey(k);
      const rec = identity();
      await store().createIdentity(rec);
      const next = await store().updateKey(k.id, { name: "after", enabled: false, identityId: rec.id, meta: HOSTILE_META }, k.updatedAt + 5);
      expect(next).toEqual({ ...k, name: "after", enabled: false, identityId: rec.id, meta: HOSTILE_META, updatedAt: k.updatedAt + 5, version: 1 });
      expect(await store().getKey(k.id)).toEqual(next);
      expect(await store().listKeys({ identityId: rec.id }, { limit: 10, afterId: null })).toEqual([next]);
      expect(await store().updateKey(newId("key"), { name: "x" }, Date.now())).toBeNull();
    });

    it("deletes a key once", async () => {
      const k = key();
      await store().createKey(k);
      expect(await store().deleteKey(k.id)).toBe(true);
      expect(await store().deleteKey(k.id)).toBe(false);
      expect(await store().getKeyByHash(k.hash)).toBeNull();
    });

    it("creates 200 keys written 32 at a time, each recorded once in the change feed", async () => {
      const before = await store().lastChangeSeq();
      const keys = Array.from({ length: 200 }, () => key());
      let next = 0;
      await Promise.all(
        Array.from({ length: 32 }, async () => {
          while (next < keys.length) await store().createKey(keys[next++]);
        }),
      );
      for (const k of keys) expect(await store().getKeyByHash(k.hash)).not.toBeNull();
      const changes = await store().changesSince(before, 10_000);
      // Seqs without a gap, and each key recorded once: in its write, or by an intent before it and a done after.
      expect(changes.map((c) => c.seq)).toEqual(changes.map((_, i) => before + 1 + i));
      const phases = new Map<string, string[]>();
      for (const c of changes) for (const k of c.keys) phases.set(k.id, [...(phases.get(k.id) ?? []), c.phase]);
      for (const k of keys) expect([["write"], ["intent", "done"]]).toContainEqual(phases.get(k.id));
      // 200 writes under the lease lock; MongoDB's indexed layout on FerretDB scans `keys` on each (~20 s on a busy 2-core machine).
    }, 90_000);
  });

  describe("finding keys by hash and by id", () => {
    it("gives a hash to one of 20 CreateKey calls racing for it, refuses the others, and keeps nothing of them", async () => {
      const hash = hashKey(randomBytes(16).toString("hex"));
      const apiId = unique("race");
      const contenders = Array.from({ length: 20 }, (_, i) => key({ hash, apiId, name: `contender ${i}` }));
      const results = await Promise.allSettled(contenders.map((k) => store().createKey(k)));
      const won = contenders.filter((_, i) => results[i].status === "fulfilled");
      expect(won).toHaveLength(1);
      for (const r of results) if (r.status === "rejected") expect(r.reason).toBeInstanceOf(AlreadyExistsError);
      const winner = won[0];
      expect(await store().getKeyByHash(hash)).toEqual(winner);
      expect(await store().listKeys({ apiId }, { limit: 100, afterId: null })).toEqual([winner]);
      for (const loser of contenders.filter((k) => k !== winner)) {
        expect(await store().getKey(loser.id)).toBeNull();
        expect(await store().updateKey(loser.id, { name: "x" }, Date.now())).toBeNull();
        expect(await store().deleteKey(loser.id)).toBe(false);
      }
      expect(await store().getKey(winner.id)).toEqual(winner);
    });

    it("keeps a key whose CreateKey comes again (a retry after a lost answer): ALREADY_EXISTS, and the key still works", async () => {
      const k = key();
      await store().createKey(k);
      expect(await thrown(store().createKey(k))).toBeInstanceOf(AlreadyExistsError);
      expect(await store().getKey(k.id)).toEqual(k);
      expect(await store().getKeyByHash(k.hash)).toEqual(k);
      expect(await store().updateKey(k.id, { name: "still here" }, k.updatedAt + 1)).toMatchObject({ id: k.id, name: "still here" });
    });

    it("refuses a key whose id is taken, under another hash, and writes nothing of it", async () => {
      const k = key();
      await store().createKey(k);
      const other = key({ id: k.id });
      expect(await thrown(store().createKey(other))).toBeInstanceOf(AlreadyExistsError);
      expect(await store().getKeyByHash(other.hash)).toBeNull();
      expect(await store().getKey(k.id)).toEqual(k);
    });

    it("does not take a deleted key for the key that holds its hash now", async () => {
      const gone = key();
      await store().createKey(gone);
      expect(await store().deleteKey(gone.id)).toBe(true);
      const now = key({ hash: gone.hash });
      await store().createKey(now);
      expect(await store().getKeyByHash(gone.hash)).toEqual(now);
      expect(await store().getKey(gone.id)).toBeNull();
      expect(await store().updateKey(gone.id, { enabled: false }, Date.now())).toBeNull();
      expect(await store().deleteKey(gone.id)).toBe(false);
      expect(await store().updateCredits({ keyId: gone.id }, { op: "set", value: 1 }, Date.now(), null)).toBeUndefined();
      expect(await store().getKey(now.id)).toEqual(now);
    });

    it("finds each of 120 keys by hash and by id, and no key for a hash it never had", async () => {
      const keys = Array.from({ length: 120 }, () => key());
      for (let i = 0; i < keys.length; i += 40) await Promise.all(keys.slice(i, i + 40).map((k) => store().createKey(k)));
      for (const k of keys) {
        expect(await store().getKeyByHash(k.hash)).toEqual(k);
        expect(await store().getKey(k.id)).toEqual(k);
      }
      expect(await store().getKeyByHash(hashKey(randomBytes(16).toString("hex")))).toBeNull();
      expect(await store().getKey(newId("key"))).toBeNull();
    }, 60_000);

    it("records when a key was last used, never earlier, and nothing for a deleted key", async () => {
      const k = key({ apiId: unique("used") });
      await store().createKey(k);
      await store().touchLastUsed(new Map([[k.id, 2_000]]));
      await store().touchLastUsed(new Map([[k.id, 1_000]]));
      expect((await store().getKey(k.id))?.lastUsedAt).toBe(2_000);
      expect((await store().listKeys({ apiId: k.apiId }, { limit: 10, afterId: null })).map((r) => r.lastUsedAt)).toEqual([2_000]);
      expect(await store().deleteKey(k.id)).toBe(true);
      await store().touchLastUsed(new Map([[k.id, 3_000]]));
      expect(await store().getKey(k.id)).toBeNull();
      expect(await store().getKeyByHash(k.hash)).toBeNull();
    });
  });

  describe("rerolling keys", () => {
    it("stores the new key and sets the old key's expiry together", async () => {
      const old = key({ name: "orig", permissions: ["p"] });
      await store().createKey(old);
      const next = key({ ...old, id: newId("key"), hash: hashKey(randomBytes(16).toString("hex")) });
      const expiresAt = Date.now() + 1000;
      expect(await store().rerollKey(old.id, next, expiresAt, old.updatedAt + 1)).toEqual(next);
      expect(await store().getKey(next.id)).toEqual(next);
      expect(await store().getKey(old.id)).toEqual({ ...old, expiresAt, updatedAt: old.updatedAt + 1, version: 1 });
    });

    it("writes nothing when the old key does not exist", async () => {
      const next = key();
      expect(await store().rerollKey(newId("key"), next, Date.now(), Date.now())).toBeNull();
      expect(await store().getKey(next.id)).toBeNull();
      expect(await store().getKeyByHash(next.hash)).toBeNull();
    });

    it("writes nothing when the new key's hash is taken", async () => {
      const old = key();
      const taken = key();
      await store().createKey(old);
      await store().createKey(taken);
      const next = key({ hash: taken.hash });
      const err = await thrown(store().rerollKey(old.id, next, Date.now(), Date.now()));
      expect(err).toBeInstanceOf(AlreadyExistsError);
      expect(await store().getKey(old.id)).toEqual(old);
      expect(await store().getKey(next.id)).toBeNull();
      expect(await store().getKey(taken.id)).toEqual(taken);
    });
  });

  describe("credits", () => {
    const targets = [
      {
        name: "key",
        make: async (credits: KeyRecord["credits"]) => {
          const k = key({ credits });
          await store().createKey(k);
          return { target: { keyId: k.id }, read: async () => (await store().getKey(k.id))!.credits };
        },
      },
      {
        name: "identity",
        make: async (credits: IdentityRecord["credits"]) => {
          const rec = identity({ credits });
          await store().createIdentity(rec);
          return { target: { identityId: rec.id }, read: async () => (await store().getIdentity(rec.id))!.credits };
        },
      },
    ];

    describe.each(targets)("of a $name", ({ make }) => {
      it("applies 50 concurrent decrements exactly once each", async () => {
        const { target, read } = await make({ remaining: 100, refill: null });
        const results = await Promise.all(
          Array.from({ length: 50 }, () => store().updateCredits(target, { op: "decrement", value: 1 }, Date.now(), null)),
        );
        expect(await read()).toEqual({ remaining: 50, refill: null });
        // Every decrement saw a different balance: none was lost or applied twice.
        const seen = results.map((c) => c!.remaining).sort((a, b) => a - b);
        expect(seen).toEqual(Array.from({ length: 50 }, (_, i) => 50 + i));
      });

      it("never goes below zero under 50 concurrent decrements", async () => {
        const { target, read } = await make({ remaining: 30, refill: null });
        const results = await Promise.all(
          Array.from({ length: 50 }, () => store().updateCredits(target, { op: "decrement", value: 1 }, Date.now(), null)),
        );
        for (const c of results) expect(c!.remaining).toBeGreaterThanOrEqual(0);
        expect(results.filter((c) => c!.remaining === 0)).toHaveLength(21);
        expect(await read()).toEqual({ remaining: 0, refill: null });
      });

      it("stops a large decrement at zero and adds an increment", async () => {
        const { target, read } = await make({ remaining: 5, refill: null });
        expect(await store().updateCredits(target, { op: "decrement", value: 9 }, Date.now(), null)).toEqual({ remaining: 0, refill: null });
        expect(await store().updateCredits(target, { op: "increment", value: 4 }, Date.now(), null)).toEqual({ remaining: 4, refill: null });
        expect(await read()).toEqual({ remaining: 4, refill: null });
      });

      it("refuses to increment or decrement an unlimited balance", async () => {
        const { target, read } = await make(null);
        expect(await thrown(store().updateCredits(target, { op: "increment", value: 1 }, Date.now(), null))).toBeInstanceOf(FailedPreconditionError);
        expect(await thrown(store().updateCredits(target, { op: "decrement", value: 1 }, Date.now(), null))).toBeInstanceOf(FailedPreconditionError);
        expect(await read()).toBeNull();
      });

      it("keeps the refill rule when the balance is set", async () => {
        const refill = { interval: "monthly" as const, amount: 1000, refillDay: 15, lastRefillAt: 123 };
        const { target, read } = await make({ remaining: 10, refill });
        expect(await store().updateCredits(target, { op: "set", value: 77 }, Date.now(), null)).toEqual({ remaining: 77, refill });
        expect(await read()).toEqual({ remaining: 77, refill });
      });

      it("sets an unlimited balance to a limited one, and back", async () => {
        const { target, read } = await make(null);
        expect(await store().updateCredits(target, { op: "set", value: 3 }, Date.now(), null)).toEqual({ remaining: 3, refill: null });
        expect(await store().updateCredits(target, { op: "set", value: null }, Date.now(), null)).toBeNull();
        expect(await read()).toBeNull();
      });
    });

    it("answers undefined for a target that does not exist", async () => {
      expect(await store().updateCredits({ keyId: newId("key") }, { op: "set", value: 1 }, Date.now(), null)).toBeUndefined();
      expect(await store().updateCredits({ identityId: newId("id") }, { op: "decrement", value: 1 }, Date.now(), null)).toBeUndefined();
    });
  });

  describe("root keys", () => {
    it("creates the bootstrap root key only once, however many callers race", async () => {
      const candidates = Array.from({ length: 5 }, rootKey);
      const results = await Promise.all(candidates.map((r) => store().createFirstRootKey(r)));
      expect(results.filter(Boolean)).toHaveLength(1);
      const winner = candidates[results.indexOf(true)];
      expect(await store().createFirstRootKey(rootKey())).toBe(false);
      const stored = (await store().listRootKeys()).filter((r) => candidates.some((c) => c.id === r.id));
      expect(stored).toEqual([winner]);
      expect(await store().getRootKeyByHash(winner.hash)).toEqual(winner);
    });

    it("refuses a second root key with a taken hash, and keeps the first", async () => {
      const first = rootKey();
      await store().createRootKey(first);
      const second = { ...rootKey(), hash: first.hash };
      expect(await thrown(store().createRootKey(second))).toBeInstanceOf(AlreadyExistsError);
      expect(await store().getRootKeyByHash(first.hash)).toEqual(first);
      const listed = await store().listRootKeys();
      expect(listed.filter((r) => r.id === first.id || r.id === second.id)).toEqual([first]);
    });

    it("finds no root key for a hash it never had, nor for a deleted one", async () => {
      const r = rootKey();
      await store().createRootKey(r);
      expect(await store().getRootKeyByHash(hashKey(randomBytes(16).toString("hex")))).toBeNull();
      expect(await store().deleteRootKey(r.id)).toBe(true);
      expect(await store().getRootKeyByHash(r.hash)).toBeNull();
      const again = { ...rootKey(), hash: r.hash };
      await store().createRootKey(again);
      expect(await store().getRootKeyByHash(r.hash)).toEqual(again);
    });

    it("stores, finds and deletes root keys", async () => {
      const r = rootKey();
      await store().createRootKey(r);
      expect(await store().getRootKeyByHash(r.hash)).toEqual(r);
      expect(await store().deleteRootKey(r.id)).toBe(true);
      expect(await store().deleteRootKey(r.id)).toBe(false);
      expect(await store().getRootKeyByHash(r.hash)).toBeNull();
    });
  });

  it("keeps every record across close and reopen", async () => {
    const rec = identity({ meta: HOSTILE_META, credits: { remaining: 9, refill: null } });
    const k = key({ identityId: rec.id, meta: HOSTILE_META });
    const r = rootKey();
    await store().createIdentity(rec);
    await store().createKey(k);
    await store().createRootKey(r);
    await store().updateCredits({ identityId: rec.id }, { op: "decrement", value: 4 }, rec.updatedAt + 1, null);

    const reopened = await ts.reopen();
    await reopened.ping();
    expect(await reopened.getIdentity(rec.id)).toEqual({ ...rec, credits: { remaining: 5, refill: null }, updatedAt: rec.updatedAt + 1, version: 1 });
    expect(await reopened.getKeyByHash(k.hash)).toEqual(k);
    expect(await reopened.getRootKeyByHash(r.hash)).toEqual(r);
  });
});
