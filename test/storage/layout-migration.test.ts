/**
 * The move of a MongoDB database written in the old shape (one `keys`
 * collection, `key_activity`, root keys found by their `hash` field) to the
 * bucketed key layout, at start (src/storage/mongodb/layout-migration.ts):
 * every key still found by hash and by id with everything it had, a move
 * stopped half-way finishes on the next start, instances starting together
 * neither lose nor double a key, and an earlier version can no longer write
 * keys where this one does not read them.
 */
import { randomBytes } from "node:crypto";
import { afterEach, beforeEach, expect, it } from "vitest";
import { AlreadyExistsError } from "../../src/domain/errors.js";
import { newId } from "../../src/domain/ids.js";
import { hashKey } from "../../src/domain/key-format.js";
import type { IdentityRecord, KeyRecord, RootKeyRecord } from "../../src/domain/types.js";
import { createKeyBuckets } from "../../src/storage/mongodb/key-layout.js";
import { LAYOUT_SETTING } from "../../src/storage/mongodb/layout-migration.js";
import { MongoStore, toKeyDoc, type MongoStoreOptions } from "../../src/storage/mongodb/mongo-store.js";
import { createRootKey } from "../../src/domain/root-keys.js";
import { grpcClients, startServer } from "../integration/support.js";
import { dropDatabase, randomDatabaseName } from "../support/harness.js";
import { identityRecord, keyRecord } from "../support/records.js";
import { describeWith, mongodbUri } from "../verify/support.js";

describeWith("MONGODB_URI", mongodbUri(), "moving a database of an earlier version to the bucketed key layout", () => {
  let database: string;
  const stores: MongoStore[] = [];
  const open = async (opts: Partial<MongoStoreOptions> = {}) => {
    const s = new MongoStore({ uri: mongodbUri()!, database, layout: "bucketed", ...opts });
    stores.push(s);
    await s.init();
    return s;
  };
  beforeEach(() => {
    database = randomDatabaseName();
  });
  afterEach(async () => {
    for (const s of stores.splice(0)) await s.close().catch(() => undefined);
    await dropDatabase(mongodbUri()!, database);
  });

  interface OldDatabase {
    identity: IdentityRecord;
    keys: KeyRecord[];
    plaintexts: string[];
    rootKey: RootKeyRecord;
    /** A root key with every permission, made by the old store. */
    rootPlaintext: string;
    lastUsed: Map<string, number>;
  }

  /**
   * A database as an earlier version left it: written by the store in the
   * indexed layout — the shape every earlier version wrote — with the record
   * of the layout removed, as no earlier version wrote one. Keys of several
   * shapes: linked to an identity, with credits, updated (version 1), last used.
   */
  async function oldDatabase(n: number): Promise<OldDatabase> {
    const old = await open({ layout: "indexed" });
    const identity = identityRecord();
    await old.createIdentity(identity);
    const made = Array.from({ length: n }, (_, i) =>
      keyRecord({
        apiId: "api_old",
        identityId: i % 3 === 0 ? identity.id : null,
        credits: i % 5 === 0 ? { remaining: 10 + i, refill: null } : null,
        meta: { i, nested: { $gt: "" } },
        permissions: ["read"],
      }),
    );
    const keys = made.map((m) => m.record);
    // In bulk (the old collection, the old documents), then a few through the store's own writes.
    await old.loadKeys(keys);
    const updated = await old.updateKey(keys[1].id, { name: "renamed", enabled: false }, keys[1].updatedAt + 1);
    keys[1] = { ...updated!, lastUsedAt: null };
    const lastUsed = new Map(keys.slice(0, 10).map((k, i) => [k.id, 1_700_000_000_000 + i]));
    await old.touchLastUsed(lastUsed);
    const rootKey: RootKeyRecord = {
      id: newId("root"),
      name: "old",
      hash: hashKey(randomBytes(16).toString("hex")),
      start: "lkroot_x",
      permissions: [{ action: "verify", apiId: null }],
      createdAt: Date.now(),
    };
    await old.createRootKey(rootKey);
    const rootPlaintext = (await createRootKey(old, "all", [{ action: "verify", apiId: null }]))!.plaintext;
    await old.client.db(database).collection<{ _id: string }>("settings").deleteOne({ _id: LAYOUT_SETTING });
    await old.close();
    stores.splice(stores.indexOf(old), 1);
    return { identity, keys, plaintexts: made.map((m) => m.plaintext), rootKey, rootPlaintext, lastUsed };
  }

  /** Every key of `old` found by hash and by id as it was (last-used times included), every root key by hash. */
  async function expectAllThere(store: MongoStore, old: OldDatabase): Promise<void> {
    for (const k of old.keys) {
      const expected = { ...k, lastUsedAt: old.lastUsed.get(k.id) ?? null };
      expect(await store.getKeyByHash(k.hash)).toEqual({ ...expected, lastUsedAt: k.lastUsedAt });
      expect(await store.getKey(k.id)).toEqual(expected);
    }
    expect(await store.getRootKeyByHash(old.rootKey.hash)).toEqual(old.rootKey);
    const listed = await store.listKeys({ identityId: old.identity.id }, { limit: 10_000, afterId: null });
    expect(listed.map((k) => k.id)).toEqual(old.keys.filter((k) => k.identityId === old.identity.id).map((k) => k.id).sort());
  }

  /** Key documents in the buckets (each counted once: a key copied twice would show here). */
  async function bucketedKeyCount(store: MongoStore): Promise<number> {
    let n = 0;
    for (const coll of await createKeyBuckets(store.client, database).hashBuckets()) n += await coll.countDocuments();
    return n;
  }

  it("moves every key, last-used time and root key, and every key is then found by hash and by id as it was", async () => {
    const old = await oldDatabase(40);
    const store = await open();
    expect(store.layout).toBe("bucketed");
    expect(store.migrated).toEqual({ keys: 40, rootKeys: 2 });
    await expectAllThere(store, old);
    expect(await bucketedKeyCount(store)).toBe(40);
    // Spends and writes work on moved keys.
    const withCredits = old.keys[0];
    expect(await store.spendCredits({ keyId: withCredits.id }, 3, null)).toMatchObject({ ok: true, remaining: 7 });
    expect(await store.updateKey(old.keys[2].id, { name: "after" }, Date.now())).toMatchObject({ id: old.keys[2].id, name: "after", version: 1 });

    // The next start has nothing left to move.
    await store.close();
    const again = await open();
    expect(again.migrated).toEqual({ keys: 0, rootKeys: 0 });
    expect(await bucketedKeyCount(again)).toBe(40);
  });

  it("keeps hashes unique across the move: a hash of a moved key is refused to a new one", async () => {
    const old = await oldDatabase(5);
    const store = await open();
    const taken = keyRecord({ hash: old.keys[3].hash }).record;
    expect(await store.createKey(taken).catch((e: unknown) => e)).toBeInstanceOf(AlreadyExistsError);
    expect(await store.getKeyByHash(old.keys[3].hash)).toEqual(old.keys[3]);
    expect(await store.getKey(taken.id)).toBeNull();
  });

  it("finishes a move stopped half-way on the next start, with no key lost or copied twice", async () => {
    const old = await oldDatabase(120);
    const crash = new Error("the process died here");
    // The first start copies one batch (50 keys), then stops as a crash would.
    await expect(open({ migrationBatch: 50, migrationAfterBatch: (n) => { if (n >= 50) throw crash; } })).rejects.toBe(crash);
    const half = stores[stores.length - 1];
    expect(await bucketedKeyCount(half)).toBe(50);
    expect(await half.client.db(database).collection("settings").findOne({ _id: LAYOUT_SETTING } as never), "no layout recorded yet").toBeNull();
    expect(await half.client.db(database).collection("keys").countDocuments(), "the old collection is kept until everything is copied").toBe(120);
    await half.close();

    const store = await open({ migrationBatch: 50 });
    expect(store.migrated?.keys).toBe(120);
    expect(await bucketedKeyCount(store)).toBe(120);
    await expectAllThere(store, old);
  }, 120_000);

  it("lets two instances starting together move the database once, both serving every key", async () => {
    const old = await oldDatabase(60);
    const [a, b] = await Promise.all([open(), open()]);
    expect([a.migrated?.keys, b.migrated?.keys].sort()).toEqual([0, 60]);
    expect(await bucketedKeyCount(a)).toBe(60);
    await expectAllThere(a, old);
    await expectAllThere(b, old);
  }, 60_000);

  it("fences the old collection: an earlier version can neither insert a key there nor find one", async () => {
    const old = await oldDatabase(3);
    const store = await open();
    const legacy = store.client.db(database).collection<{ _id: string }>("keys");
    // What an earlier version's CreateKey would do.
    const stray = keyRecord().record;
    const refused = await legacy.insertOne(toKeyDoc(stray) as never).catch((e: unknown) => e);
    expect(String((refused as Error).message)).toMatch(/duplicate|UNIQUE/i);
    expect(await legacy.findOne({ hash: old.keys[0].hash } as never)).toBeNull();
    expect(await store.getKeyByHash(stray.hash)).toBeNull();
  });

  it("serves a database of an earlier version from the start: a real server verifies every key over gRPC", async () => {
    const old = await oldDatabase(12);
    const server = await startServer({ env: { MONGODB_URI: mongodbUri()!, LATCHKEY_MONGODB_DATABASE: database, LATCHKEY_RATELIMIT_BACKEND: "memory" } });
    const client = grpcClients(server.address);
    try {
      for (const [i, key] of old.plaintexts.entries()) {
        const res = await client.call(client.keys, "VerifyKey", { key, api_id: "api_old" }, old.rootPlaintext);
        expect(res.code, `key ${i}`).toBe(old.keys[i].enabled ? "VERIFICATION_CODE_VALID" : "VERIFICATION_CODE_DISABLED");
        expect(res.key_id).toBe(old.keys[i].id);
      }
    } finally {
      client.close();
      await server.stop();
    }
    // The server chose its server's layout: on FerretDB it moved the keys.
    const after = await open();
    expect(after.layout).toBe(after.flavor === "ferretdb" ? "bucketed" : "indexed");
  }, 60_000);

  it("leaves a database that recorded the indexed layout as it is", async () => {
    const indexed = await open({ layout: "indexed" });
    const k = keyRecord().record;
    await indexed.createKey(k);
    await indexed.close();
    const reopened = await open({ layout: "bucketed" });
    expect(reopened.layout).toBe("indexed");
    expect(reopened.migrated).toBeNull();
    expect(await reopened.getKeyByHash(k.hash)).toEqual(k);
  });
});
