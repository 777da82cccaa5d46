/**
 * Bucketed key documents (FerretDB's layout) leave out what says nothing: the
 * hash (it is the `_id`), the last-used time (kept in `key_last_used`) and an
 * empty expiry, balance or rate-limit list — FerretDB parses every document of
 * a bucket for each `_id` lookup, so a cold verification costs it less the
 * smaller they are. Every read, spend, update and reroll must see such a key
 * exactly as it was created, and documents written before (every field) must
 * read the same.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MongoClient, type Collection, type Document } from "mongodb";
import { newId } from "../../src/domain/ids.js";
import { companionDatabase, keyHashLocation } from "../../src/storage/mongodb/key-layout.js";
import { MongoStore, toKeyDoc } from "../../src/storage/mongodb/mongo-store.js";
import type { KeyRecord } from "../../src/domain/types.js";
import { dropDatabase, randomDatabaseName } from "../support/harness.js";
import { keyRecord } from "../support/records.js";
import { describeWith, mongodbUri } from "../verify/support.js";

describeWith("MONGODB_URI", mongodbUri(), "slim key documents on the bucketed layout", () => {
  const database = randomDatabaseName();
  let store: MongoStore;
  let client: MongoClient;

  beforeAll(async () => {
    store = new MongoStore({ uri: mongodbUri()!, database, layout: "bucketed" });
    await store.init();
    client = new MongoClient(mongodbUri()!);
    await client.connect();
  }, 60_000);
  afterAll(async () => {
    await client?.close();
    await store?.close();
    await dropDatabase(mongodbUri()!, database);
  });

  const bucketOf = (hash: string): Collection<Document> => {
    const { suffix, collection } = keyHashLocation(hash);
    return client.db(companionDatabase(database, suffix)).collection(collection);
  };
  const stored = async (hash: string) => (await bucketOf(hash).findOne({ _id: hash as never }))!;

  it("leaves out the hash, the last-used time and an empty expiry, balance and limit list, and reads the key back as created", async () => {
    const { record } = keyRecord({ name: "slim", meta: { plan: "pro" }, permissions: ["read"] });
    await store.createKey(record);
    const doc = await stored(record.hash);
    for (const field of ["hash", "lastUsedAt", "expiresAt", "credits", "ratelimits"]) expect(doc, field).not.toHaveProperty(field);
    expect(doc.keyId).toBe(record.id);
    expect(await store.getKeyByHash(record.hash)).toEqual(record);
    expect(await store.getKey(record.id)).toEqual(record);
  });

  it("keeps an expiry, a balance and rate limits when a key has them", async () => {
    const { record } = keyRecord({
      expiresAt: Date.now() + 3_600_000,
      credits: { remaining: 5, refill: null },
      ratelimits: [{ name: "r", limit: 10, durationMs: 1000, autoApply: true }],
    });
    await store.createKey(record);
    const doc = await stored(record.hash);
    expect(doc.expiresAt).toBe(record.expiresAt);
    expect(doc.credits).toEqual(record.credits);
    expect(doc.ratelimits).toEqual(record.ratelimits);
    expect(await store.getKeyByHash(record.hash)).toEqual(record);
  });

  it("reads a document written before (every field, the hash too) as the same key", async () => {
    const { record } = keyRecord({ name: "earlier" });
    // As the previous release wrote it: its id pointer, then the whole record at `_id` = hash.
    await store.createKey(record);
    await bucketOf(record.hash).replaceOne({ _id: record.hash as never }, { ...toKeyDoc(record), _id: record.hash, keyId: record.id });
    expect(await stored(record.hash)).toHaveProperty("hash", record.hash);
    expect(await store.getKeyByHash(record.hash)).toEqual(record);
    expect(await store.spendCredits({ keyId: record.id }, 1, null)).toMatchObject({ ok: true, remaining: null });
  });

  it("keeps the last-used time of a key loaded in bulk (beside its id, not in the slim document)", async () => {
    const { record } = keyRecord({ lastUsedAt: Date.now() - 60_000 });
    await store.loadKeys([record]);
    expect(await stored(record.hash)).not.toHaveProperty("lastUsedAt");
    expect((await store.getKey(record.id))!.lastUsedAt).toBe(record.lastUsedAt);
  });

  it("spends nothing from a key without a balance, and a balance set later is kept and spent", async () => {
    const { record } = keyRecord();
    await store.createKey(record);
    expect(await store.spendCredits({ keyId: record.id }, 1, null)).toMatchObject({ ok: true, remaining: null });
    await store.updateCredits({ keyId: record.id }, { op: "set", value: 2 }, Date.now(), null);
    expect((await stored(record.hash)).credits).toEqual({ remaining: 2, refill: null });
    expect(await store.spendCredits({ keyId: record.id }, 2, null)).toMatchObject({ ok: true, remaining: 0 });
    expect(await store.spendCredits({ keyId: record.id }, 1, null)).toMatchObject({ ok: false });
    expect((await store.getKeyByHash(record.hash))!.credits).toEqual({ remaining: 0, refill: null });
  });

  it("announces a balance change of a slim key by its hash in the change feed (other instances evict it by hash)", async () => {
    const { record } = keyRecord();
    await store.createKey(record);
    const before = await store.lastChangeSeq();
    await store.updateCredits({ keyId: record.id }, { op: "set", value: 7 }, Date.now(), null);
    const changes = await store.changesSince(before, 100);
    expect(changes.length).toBeGreaterThan(0);
    for (const c of changes) expect(c.keys).toEqual([{ id: record.id, hash: record.hash }]);
  });

  it("rerolls a key without a balance without pointing it at the new key's (there is none to share)", async () => {
    const { record } = keyRecord();
    await store.createKey(record);
    const next: KeyRecord = { ...keyRecord().record, id: newId("key"), apiId: record.apiId };
    const created = await store.rerollKey(record.id, next, Date.now() + 60_000, Date.now());
    expect(created!.credits).toBeNull();
    const old = await store.getKey(record.id);
    expect(old!.creditsKeyId ?? null).toBeNull();
    expect(old!.credits).toBeNull();
    expect((await stored(record.hash)).creditsKeyId ?? null).toBeNull();
  });

  it("rerolls a key with a balance: the old key spends from the new one's", async () => {
    const { record } = keyRecord({ credits: { remaining: 3, refill: null } });
    await store.createKey(record);
    const next: KeyRecord = { ...keyRecord().record, id: newId("key"), apiId: record.apiId };
    await store.rerollKey(record.id, next, Date.now() + 60_000, Date.now());
    expect((await stored(record.hash)).creditsKeyId).toBe(next.id);
    expect(await store.spendCredits({ keyId: record.id }, 1, null)).toMatchObject({ ok: true, remaining: 2 });
    expect((await store.getKey(next.id))!.credits).toEqual({ remaining: 2, refill: null });
  });
});

describe("slim key documents", () => {
  it("are only written on the bucketed layout (MongoDB proper keeps every field, for its hash index)", () => {
    const { record } = keyRecord();
    expect(toKeyDoc(record)).toHaveProperty("hash", record.hash);
    expect(toKeyDoc(record)).toHaveProperty("credits", null);
  });
});
