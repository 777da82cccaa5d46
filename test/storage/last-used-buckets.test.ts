/**
 * Last-used times on the bucketed key layout (FerretDB): collected in memory and
 * written every roll-up period as one `$max` statement per key-id bucket, not one
 * per key; this process reads them before they are written, another process once
 * they are; a write that fails keeps them for the next one; close writes them.
 */
import type { CommandStartedEvent } from "mongodb";
import { afterAll, expect, it } from "vitest";
import { MongoStore, type MongoStoreOptions } from "../../src/storage/mongodb/mongo-store.js";
import { dropDatabase, mongoUri, randomDatabaseName } from "../support/harness.js";
import { keyRecord } from "../support/records.js";
import { describeWith } from "../usage/support.js";

describeWith("MONGODB_URI", mongoUri(), "last-used times, bucketed layout (MongoDB store)", () => {
  const uri = mongoUri()!;
  const databases: string[] = [];
  afterAll(async () => {
    for (const d of databases) await dropDatabase(uri, d);
  });
  const open = async (database: string, opts: Partial<MongoStoreOptions> = {}) => {
    const s = new MongoStore({ uri, database, serverSelectionTimeoutMs: 5000, layout: "bucketed", usageRollupMs: 0, ...opts });
    await s.init();
    return s;
  };

  it("writes the times of 300 keys as one statement per id bucket, readable here before and elsewhere after", async () => {
    const database = randomDatabaseName();
    databases.push(database);
    const a = await open(database, { monitorCommands: true });
    const b = await open(database);
    const commands: CommandStartedEvent[] = [];
    a.client.on("commandStarted", (e) => commands.push(e));
    try {
      const keys = Array.from({ length: 300 }, () => keyRecord().record);
      for (let i = 0; i < keys.length; i += 50) await Promise.all(keys.slice(i, i + 50).map((k) => a.createKey(k)));
      const at = new Map(keys.map((k, i) => [k.id, 1_000_000 + i]));
      commands.length = 0;
      await a.touchLastUsed(at);
      await a.touchLastUsed(new Map([[keys[0].id, 5]])); // earlier: never moves a time back
      expect(commands.filter((c) => ["update", "insert"].includes(c.commandName))).toEqual([]); // collected, not written yet
      expect((await a.getKey(keys[7].id))?.lastUsedAt).toBe(1_000_007);
      expect((await b.getKey(keys[7].id))?.lastUsedAt).toBeNull();

      await a.rollUpUsage();
      const updates = commands.filter((c) => c.commandName === "update" && c.command.update === "key_last_used");
      expect(updates).toHaveLength(1);
      const statements = updates[0].command.updates as { q: { _id: string } }[];
      expect(statements.length).toBeLessThanOrEqual(256); // one per id bucket, however many keys
      expect(new Set(statements.map((u) => u.q._id)).size).toBe(statements.length);
      for (const [i, k] of keys.entries()) expect((await b.getKey(k.id))?.lastUsedAt, k.id).toBe(1_000_000 + i);
      expect((await b.listKeys({ apiId: keys[3].apiId }, { limit: 10, afterId: null })).map((r) => r.lastUsedAt)).toEqual([1_000_003]);
      // A deleted key's time goes with it (the bucket documents do not keep every key ever used).
      const lastUsed = a.client.db(database).collection<{ _id: string; t: Record<string, number> }>("key_last_used");
      const bucketOf = async (id: string) => (await lastUsed.find({}).toArray()).find((d) => id in (d.t ?? {}));
      expect(await bucketOf(keys[5].id)).toBeDefined();
      expect(await a.deleteKey(keys[5].id)).toBe(true);
      expect(await bucketOf(keys[5].id)).toBeUndefined();
      expect(await bucketOf(keys[6].id)).toBeDefined();
    } finally {
      await a.close();
      await b.close();
    }
  });

  it("writes the collected times by itself every usageRollupMs, without a close or a call", async () => {
    const database = randomDatabaseName();
    databases.push(database);
    const a = await open(database, { usageRollupMs: 200 });
    const b = await open(database);
    try {
      const k = keyRecord().record;
      await a.createKey(k);
      await a.touchLastUsed(new Map([[k.id, 30_000]]));
      // Polled, not slept: the store's roll-up timer writes the time; another store then reads it.
      const deadline = Date.now() + 15_000;
      while ((await b.getKey(k.id))?.lastUsedAt !== 30_000 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
      expect((await b.getKey(k.id))?.lastUsedAt).toBe(30_000);
    } finally {
      await a.close();
      await b.close();
    }
  });

  it("keeps the times of a write that failed and writes them with the next; close writes what is left", async () => {
    const database = randomDatabaseName();
    databases.push(database);
    const a = await open(database);
    const b = await open(database);
    const coll = (a as unknown as { lastUsed: { bulkWrite: (...x: unknown[]) => Promise<unknown> } }).lastUsed;
    const bulkWrite = coll.bulkWrite.bind(coll);
    try {
      const k1 = keyRecord().record;
      const k2 = keyRecord().record;
      await a.createKey(k1);
      await a.createKey(k2);
      await a.touchLastUsed(new Map([[k1.id, 10_000]]));
      coll.bulkWrite = async () => {
        throw Object.assign(new Error("injected: connection closed"), { name: "MongoNetworkError" });
      };
      await expect(a.rollUpUsage()).rejects.toThrow(/MongoNetworkError/);
      coll.bulkWrite = bulkWrite;
      expect((await b.getKey(k1.id))?.lastUsedAt).toBeNull();
      expect((await a.getKey(k1.id))?.lastUsedAt).toBe(10_000);
      await a.touchLastUsed(new Map([[k2.id, 20_000]]));
      await a.close();
      expect((await b.getKey(k1.id))?.lastUsedAt).toBe(10_000);
      expect((await b.getKey(k2.id))?.lastUsedAt).toBe(20_000);
    } finally {
      coll.bulkWrite = bulkWrite;
      await b.close();
    }
  });
});
