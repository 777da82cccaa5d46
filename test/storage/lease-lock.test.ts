/**
 * The MongoDB store's lease lock (src/storage/mongodb/lease-lock.ts), on the
 * server CI runs (FerretDB): a dead holder is taken over within a lease (1.5 s)
 * measured by the waiter's own clock, a live one never; the queue in front of
 * it is bounded; and a holder that lost its lock while stalled writes nothing
 * (a fenced write). Other processes are played by documents the test writes,
 * or by a second store behind a TCP proxy the test can hold.
 */
import { afterEach, beforeEach, expect, it } from "vitest";
import { UnavailableError } from "../../src/domain/errors.js";
import { keyHashLocation } from "../../src/storage/mongodb/key-layout.js";
import { MongoStore } from "../../src/storage/mongodb/mongo-store.js";
import { dropDatabase, randomDatabaseName } from "../support/harness.js";
import { keyRecord } from "../support/records.js";
import { isMongoCommand, startTcpProxy } from "../support/tcp-proxy.js";
import { describeWith, mongodbUri } from "../verify/support.js";

type LockDoc = { _id: string; token: string; beat: number };

describeWith("MONGODB_URI", mongodbUri(), "the MongoDB lease lock", () => {
  let database: string;
  const stores: MongoStore[] = [];
  const open = async (opts: Partial<ConstructorParameters<typeof MongoStore>[0]> = {}) => {
    const s = new MongoStore({ uri: mongodbUri()!, database, creditWrites: "locked", ...opts });
    await s.init();
    stores.push(s);
    return s;
  };
  beforeEach(() => {
    database = randomDatabaseName();
  });
  afterEach(async () => {
    for (const s of stores.splice(0)) await s.close().catch(() => undefined);
    await dropDatabase(mongodbUri()!, database);
  });

  async function keyWith(store: MongoStore, remaining: number): Promise<string> {
    return (await keyRecordWith(store, remaining)).id;
  }
  async function keyRecordWith(store: MongoStore, remaining: number) {
    const k = keyRecord({ credits: { remaining, refill: null } });
    await store.createKey(k.record);
    return k.record;
  }
  /** The collection holding a key's document (key-layout.ts). */
  const keyCollectionOf = (store: MongoStore, k: { hash: string }) => (store.layout === "bucketed" ? keyHashLocation(k.hash).collection : "keys");
  const locksOf = (store: MongoStore) => store.client.db(database).collection<LockDoc>("locks");

  it("takes over the lock of a holder that died, within a lease, and spends", async () => {
    const store = await open();
    const id = await keyWith(store, 5);
    await locksOf(store).insertOne({ _id: `key:${id}`, token: "crashed-process", beat: 0 });
    expect(await store.spendCredits({ keyId: id }, 1, null)).toMatchObject({ ok: true, remaining: 4 });
    expect(await locksOf(store).countDocuments({ _id: { $regex: `^key:${id}#` } }), "no takeover marker left").toBe(0);
  });

  it("waits for a live holder however long it holds, and spends once it releases", async () => {
    const store = await open({ lock: { leaseMs: 200 } });
    const id = await keyWith(store, 5);
    await locksOf(store).insertOne({ _id: `key:${id}`, token: "slow-but-alive", beat: 0 });
    const beating = setInterval(() => void locksOf(store).updateOne({ _id: `key:${id}`, token: "slow-but-alive" }, { $inc: { beat: 1 } }), 40);
    let released = false;
    try {
      const spend = store.spendCredits({ keyId: id }, 1, null);
      // Five leases of life signs, then the holder lets go.
      setTimeout(() => {
        clearInterval(beating);
        void locksOf(store)
          .deleteOne({ _id: `key:${id}`, token: "slow-but-alive" })
          .then(() => (released = true));
      }, 1000);
      expect(await spend).toMatchObject({ ok: true, remaining: 4 });
      expect(released, "the spend went ahead only after the live holder released").toBe(true);
    } finally {
      clearInterval(beating);
    }
  });

  it("refuses at once, with UNAVAILABLE, a call that finds the queue for a lock full", async () => {
    const store = await open({ lock: { queueMax: 2 } });
    const id = await keyWith(store, 50);
    await locksOf(store).insertOne({ _id: `key:${id}`, token: "other-process", beat: 0 });
    const beating = setInterval(() => void locksOf(store).updateOne({ _id: `key:${id}` }, { $inc: { beat: 1 } }), 100);
    try {
      const settled: boolean[] = [];
      const calls = Array.from({ length: 3 }, (_, i) =>
        store.updateCredits({ keyId: id }, { op: "decrement", value: 1 }, Date.now(), null).finally(() => (settled[i] = true)),
      );
      // One call waits on the store, two in the queue: the fourth is refused at once.
      const refused = await store.updateCredits({ keyId: id }, { op: "decrement", value: 1 }, Date.now(), null).catch((e: unknown) => e);
      expect(refused).toBeInstanceOf(UnavailableError);
      expect((refused as Error).message).toMatch(/already wait/);
      expect(settled).toEqual([]);
      clearInterval(beating);
      await locksOf(store).deleteOne({ _id: `key:${id}` });
      expect((await Promise.all(calls)).map((c) => c!.remaining).sort((a, b) => a - b)).toEqual([47, 48, 49]);
    } finally {
      clearInterval(beating);
    }
  });

  it("writes nothing for a holder that lost its lock while stalled: its fenced write is refused", async () => {
    const uri = new URL(mongodbUri()!);
    const proxy = await startTcpProxy({ host: uri.hostname, port: Number(uri.port || 27017) });
    try {
      const lock = { leaseMs: 300 };
      const stalled = await open({ uri: `mongodb://${proxy.address}/?directConnection=true`, lock });
      const other = await open({ lock });
      const k = await keyRecordWith(other, 10);
      const id = k.id;
      // A holds the lock and has read the balance; its write (and its life signs) stall on the way.
      const writing = proxy.holdWhen((chunk) => isMongoCommand(chunk, "update", keyCollectionOf(other, k)));
      const a = stalled.spendCredits({ keyId: id }, 1, null).then(
        (r) => ({ ok: r.ok }),
        (e: Error) => ({ error: e }),
      );
      await writing;
      // B sees no life sign for a lease, takes the lock over and spends.
      expect(await other.spendCredits({ keyId: id }, 1, null)).toMatchObject({ ok: true, remaining: 9 });
      // A's write arrives late: refused by the fence, and A says so.
      proxy.release();
      const late = await a;
      expect("error" in late && late.error).toBeInstanceOf(UnavailableError);
      expect((await other.getKey(id))!.credits!.remaining).toBe(9);
    } finally {
      await proxy.close();
    }
  }, 30_000);

  it("lets exactly one of two waiters take over a dead holder; both spend, one after the other", async () => {
    const a = await open();
    const b = await open();
    const id = await keyWith(a, 5);
    await locksOf(a).insertOne({ _id: `key:${id}`, token: "crashed-process", beat: 0 });
    const res = await Promise.all([a.spendCredits({ keyId: id }, 1, null), b.spendCredits({ keyId: id }, 1, null)]);
    expect(res.map((r) => r.remaining).sort()).toEqual([3, 4]);
    expect((await a.getKey(id))!.credits!.remaining).toBe(3);
  });
});
