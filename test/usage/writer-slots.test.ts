/**
 * MongoDB usage rows are kept per writer slot, not per process: a process leases
 * one of a few slots and a restart takes it again, so rows grow with the number
 * of instances running at once, never with restarts. A crashed process's slot is
 * taken over once its lease ran out, and counting stays exact across owners.
 */
import { MongoClient } from "mongodb";
import { afterAll, beforeAll, expect, it } from "vitest";
import { MongoStore } from "../../src/storage/mongodb/mongo-store.js";
import { emptyCounts, type Counts, type UsageRow } from "../../src/domain/usage.js";
import { dropDatabase, mongoUri, randomDatabaseName, unique } from "../support/harness.js";
import { DAY, describeWith, floorTo, MINUTE } from "./support.js";

/** One minute's verifications of a key, as the recorder writes them (the store derives the hour and day rows). */
function rolledUp(at: number, keyId: string, c: Partial<Counts>): UsageRow[] {
  return [{ granularity: "minute", bucket: floorTo(at, MINUTE), keyId, identityId: null, tag: "", counts: { ...emptyCounts(), ...c } }];
}

describeWith("MONGODB_URI", mongoUri(), "usage writer slots (MongoDB store)", () => {
  const uri = mongoUri()!;
  const database = randomDatabaseName();
  let raw: MongoClient;
  beforeAll(async () => {
    raw = new MongoClient(uri);
    await raw.connect();
  });
  afterAll(async () => {
    await raw?.close();
    await dropDatabase(uri, database);
  });

  const open = async (leaseMs = 60_000) => {
    const s = new MongoStore({ uri, database, serverSelectionTimeoutMs: 5000, usageLeaseMs: leaseMs });
    await s.init();
    return s;
  };
  /** The key's stored rows of granularity `g`: the rows of it inside packs (usage.ts), one per slot and bucket. */
  const rowsOf = async (keyId: string, g = "day") =>
    (await raw.db(database).collection("usage").find({ k: keyId, g }).toArray()).flatMap((d) => (JSON.parse(d.data as string) as { k: string }[]).filter((r) => r.k === keyId).map((r) => ({ ...r, s: d.s, b: d.b })));
  const total = async (s: MongoStore, keyId: string) =>
    (await s.queryUsage({ by: { keyId }, granularity: "day", start: 0, end: Date.now() + 2 * DAY, tagged: false, maxRows: 1000 })).reduce(
      (n, r) => n + r.counts.total,
      0,
    );

  it("keeps one row per bucket and key across ten restarts of one process", async () => {
    const keyId = `key_${unique("restarts")}`;
    for (let i = 0; i < 10; i++) {
      const s = await open();
      // Each process has its own recorder writer id and starts its batches at seq 1.
      const writer = unique("process");
      await s.writeUsage(rolledUp(Date.now(), keyId, { total: 1, valid: 1 }), { writer, seq: 1 });
      await s.writeUsage(rolledUp(Date.now(), keyId, { total: 2, valid: 2 }), { writer, seq: 2 });
      await s.close();
    }
    expect(await rowsOf(keyId)).toHaveLength(1);
    const s = await open();
    expect(await total(s, keyId)).toBe(30);
    await s.close();
  });

  it("gives instances running at once a slot each, and counts both", async () => {
    const keyId = `key_${unique("two")}`;
    const [a, b] = await Promise.all([open(), open()]);
    await Promise.all([
      a.writeUsage(rolledUp(Date.now(), keyId, { total: 5 }), { writer: unique("a"), seq: 1 }),
      b.writeUsage(rolledUp(Date.now(), keyId, { total: 7 }), { writer: unique("b"), seq: 1 }),
    ]);
    expect(await total(a, keyId)).toBe(12); // from the log, before any roll-up
    await Promise.all([a.rollUpUsage(), b.rollUpUsage()]);
    expect(await rowsOf(keyId)).toHaveLength(2);
    expect(await total(a, keyId)).toBe(12);
    await Promise.all([a.close(), b.close()]);
  });

  it("gives each of many processes racing for expired slots a slot of its own", async () => {
    const db = raw.db(database).collection<{ _id: string; owner: string; until: number; seq: number }>("usage_writers");
    for (let round = 0; round < 5; round++) {
      // Eight expired leases (crashed owners), then eight processes starting at once.
      await db.deleteMany({});
      await db.insertMany(Array.from({ length: 8 }, (_, n) => ({ _id: `w${n}`, owner: `dead${n}`, until: 1, seq: 10 })));
      const stores = await Promise.all(Array.from({ length: 8 }, () => open()));
      const keyId = `key_${unique("race")}`;
      await Promise.all(stores.map((s) => s.writeUsage(rolledUp(Date.now(), keyId, { total: 1 }), { writer: unique("p"), seq: 1 })));
      await Promise.all(stores.map((s) => s.rollUpUsage()));
      const owners = (await db.find({ _id: { $in: Array.from({ length: 8 }, (_, n) => `w${n}`) } }).toArray()).map((d) => d.owner);
      expect(new Set(owners).size, `round ${round}: one owner per slot`).toBe(8);
      expect(await rowsOf(keyId), `round ${round}`).toHaveLength(8);
      expect(await total(stores[0], keyId)).toBe(8);
      await Promise.all(stores.map((s) => s.close()));
    }
  });

  it("takes over a crashed process's slot once its lease ran out, counting exactly", async () => {
    const keyId = `key_${unique("crash")}`;
    const dead = await open(400);
    const writer = unique("dead");
    await dead.writeUsage(rolledUp(Date.now(), keyId, { total: 1 }), { writer, seq: 1 });
    await dead.writeUsage(rolledUp(Date.now(), keyId, { total: 1 }), { writer, seq: 2 });
    // A crash: the connection goes, the lease is never given back.
    await dead.client.close(true);

    // While the lease runs, a new process takes another slot.
    const early = await open(400);
    await early.writeUsage(rolledUp(Date.now(), keyId, { total: 10 }), { writer: unique("early"), seq: 1 });
    expect(await total(early, keyId)).toBe(12); // the dead process's batches, from the log it left
    await early.close(); // applies its own log: one row; the dead slot's log waits for the slot's next owner
    expect(await rowsOf(keyId)).toHaveLength(1);

    // The early process gave its slot back; once the dead lease ran out, both slots
    // are free again and a restart reuses one of them: still two rows.
    await new Promise((r) => setTimeout(r, 500));
    const next = await open(400);
    const w = unique("next");
    // The new owner's batch 1 is not mistaken for the dead owner's (whose rows are at seq 2).
    await next.writeUsage(rolledUp(Date.now(), keyId, { total: 100 }), { writer: w, seq: 1 });
    await next.writeUsage(rolledUp(Date.now(), keyId, { total: 100 }), { writer: w, seq: 1 }); // a retry
    expect(await total(next, keyId)).toBe(112);
    await next.rollUpUsage(); // the dead slot's log (its next owner's), then its own batch
    expect(await rowsOf(keyId)).toHaveLength(2);
    expect(await total(next, keyId)).toBe(112);
    expect(await raw.db(database).collection("usage_log").countDocuments({})).toBe(0);
    await next.close();
  });

  it("retries a batch on the same slot after the lease lapsed while the store was away", async () => {
    const keyId = `key_${unique("lapse")}`;
    const s = await open(300);
    const writer = unique("p");
    await s.writeUsage(rolledUp(Date.now(), keyId, { total: 3 }), { writer, seq: 1 });
    // No renewal for longer than the lease (as during an outage); nobody took the slot.
    await new Promise((r) => setTimeout(r, 400));
    await s.writeUsage(rolledUp(Date.now(), keyId, { total: 3 }), { writer, seq: 1 }); // the retry of batch 1
    await s.writeUsage(rolledUp(Date.now(), keyId, { total: 4 }), { writer, seq: 2 });
    await s.rollUpUsage();
    expect(await rowsOf(keyId)).toHaveLength(1);
    expect(await total(s, keyId)).toBe(7);
    await s.close();
  });
});
