/**
 * MongoDB usage: a flush is one insert into the usage log and writes no row; a
 * roll-up writes the rows it touches again as new versions (inserts) and
 * deletes the older ones and the log — no update, no `_id` lookup; a roll-up
 * that stops half-way (a failure, or a crash of its process) is finished by
 * running it again — in the same process, or by the slot's next owner — and
 * counts every verification once; reads in between count each once too (the
 * newest version of a row, and the log rows above its seq).
 */
import type { CommandStartedEvent } from "mongodb";
import { MongoClient } from "mongodb";
import { afterAll, beforeAll, expect, it } from "vitest";
import { MongoStore, type MongoStoreOptions } from "../../src/storage/mongodb/mongo-store.js";
import { emptyCounts, type UsageRow } from "../../src/domain/usage.js";
import { dropDatabase, mongoUri, randomDatabaseName, unique } from "../support/harness.js";
import { DAY, describeWith, floorTo, HOUR, MINUTE } from "./support.js";

/** One time for every batch of this file: a test's batches fall in one minute bucket, however long it runs. */
const AT = Date.now();

/** A minute row for each of `keys`, `total` verifications each (the store derives their hour and day rows). */
function batchOf(keys: string[], total: number, at = AT): UsageRow[] {
  return keys.map((keyId) => ({
    granularity: "minute",
    bucket: floorTo(at, MINUTE),
    keyId,
    identityId: "id_log",
    tag: "",
    counts: { ...emptyCounts(), total, valid: total },
  }));
}

describeWith("MONGODB_URI", mongoUri(), "usage log and roll-up (MongoDB store)", () => {
  const uri = mongoUri()!;
  let raw: MongoClient;
  const databases: string[] = [];
  beforeAll(async () => {
    raw = new MongoClient(uri);
    await raw.connect();
  });
  afterAll(async () => {
    await raw?.close();
    for (const d of databases) await dropDatabase(uri, d);
  });

  const open = async (database: string, opts: Partial<MongoStoreOptions> = {}) => {
    const s = new MongoStore({ uri, database, serverSelectionTimeoutMs: 5000, usageRollupMs: 0, ...opts });
    await s.init();
    return s;
  };
  /** A store whose first roll-up stops after its first chunk of 50 rows (as if it failed there). */
  const openStoppingOnce = (database: string) => {
    let failAfter: number | null = 50;
    return open(database, {
      usageRollupChunk: 50,
      usageRollupAfterChunk: (applied) => {
        if (failAfter !== null && applied >= failAfter) {
          failAfter = null;
          throw new Error("injected: roll-up stopped");
        }
      },
    });
  };
  const fresh = () => {
    const d = randomDatabaseName();
    databases.push(d);
    return d;
  };
  const identityTotal = async (s: MongoStore, g: "minute" | "hour" | "day" = "day") =>
    (await s.queryUsage({ by: { identityId: "id_log" }, granularity: g, start: 0, end: Date.now() + 2 * DAY, tagged: false, maxRows: 10_000 })).reduce((n, r) => n + r.counts.total, 0);
  const logCount = (database: string) => raw.db(database).collection("usage_log").countDocuments({});
  /** Rows in the usage collection: a pack counts its rows. */
  const rowCount = async (database: string) =>
    (await raw.db(database).collection("usage").find({}).toArray()).reduce((n, d) => n + (typeof d.data === "string" ? (JSON.parse(d.data) as unknown[]).length : 1), 0);

  it("writes a flush as one insert into the log, no row; the roll-up inserts the rows, updates none, and empties the log", async () => {
    const database = fresh();
    const s = await open(database, { monitorCommands: true });
    const commands: CommandStartedEvent[] = [];
    s.client.on("commandStarted", (e) => commands.push(e));
    try {
      const keys = Array.from({ length: 300 }, (_, i) => `key_${unique(`a${i}`)}`);
      await s.writeUsage(batchOf(keys, 1), { writer: "w-a", seq: 1 });
      const writes = commands.filter((c) => ["insert", "update", "delete"].includes(c.commandName) && ["usage", "usage_log"].includes(String(c.command[c.commandName])));
      expect(writes.map((c) => `${c.commandName} ${String(c.command[c.commandName])}`)).toEqual(["insert usage_log"]);
      expect(await rowCount(database)).toBe(0);
      expect(await identityTotal(s)).toBe(300); // read from the log

      commands.length = 0;
      await s.rollUpUsage();
      // Inserts, and deletes by _id: no update (on FerretDB a scan of the collection per row).
      const rowWrites = commands.filter((c) => ["insert", "update", "delete"].includes(c.commandName) && ["usage", "usage_log"].includes(String(c.command[c.commandName])));
      expect(new Set(rowWrites.map((c) => c.commandName))).toEqual(new Set(["insert", "delete"]));
      const deletes = rowWrites.filter((c) => c.commandName === "delete").flatMap((c) => c.command.deletes as { q: Record<string, unknown>; limit: number }[]);
      expect(deletes.length).toBeGreaterThan(0);
      for (const d of deletes) expect(Object.keys(d.q)).toEqual(["_id"]);
      // 900 rows (300 keys × minute, hour, day: the hour and day rows derived from the logged minute rows) in packs of at most 200 rows, each pack one bucket.
      const packs = rowWrites.filter((c) => c.commandName === "insert" && c.command.insert === "usage").flatMap((c) => c.command.documents as { g: string; data: string; i: string[]; k: string[] }[]);
      expect(packs.map((p) => `${p.g} ${(JSON.parse(p.data) as unknown[]).length}`).sort()).toEqual(["day 100", "day 200", "hour 100", "hour 200", "minute 100", "minute 200"]);
      // Each pack lists the identities and keys of its rows (what a read by identity or key finds it by).
      for (const p of packs) expect([p.i, p.k.length]).toEqual([["id_log"], (JSON.parse(p.data) as unknown[]).length]);
      expect(await logCount(database)).toBe(0);
      expect(await rowCount(database)).toBe(900);
      expect(await identityTotal(s)).toBe(300);
      expect(await identityTotal(s, "minute")).toBe(300);
    } finally {
      await s.close();
    }
  });

  it("logs a batch's minute rows as one JSON string with its identities and keys, and still reads and rolls up log documents of the earlier shapes", async () => {
    const database = fresh();
    const s = await open(database);
    try {
      const keys = Array.from({ length: 4 }, (_, i) => `key_${unique(`j${i}`)}`);
      await s.writeUsage(batchOf(keys, 2), { writer: "w-j", seq: 1 });
      const [doc] = await raw.db(database).collection("usage_log").find({}).toArray();
      expect(typeof doc.data).toBe("string");
      expect(doc.rows).toBeUndefined();
      expect(doc.m).toBe(1);
      expect(doc.i).toEqual(["id_log"]);
      expect([...(doc.k as string[])].sort()).toEqual([...keys].sort());
      const minuteRows = JSON.parse(doc.data as string) as { g: string; b: number }[];
      expect(new Set(minuteRows.map((r) => r.g))).toEqual(new Set(["minute"]));
      expect(await identityTotal(s)).toBe(8); // day rows derived from the logged minutes
      // The earlier releases logged each minute row with its hour and day rows and no `m`:
      // as an array of documents (`rows`), then as a JSON string (`data`). Neither is derived from again.
      const allThree = minuteRows.flatMap((r) => [r, { ...r, g: "hour", b: floorTo(r.b, HOUR) }, { ...r, g: "day", b: floorTo(r.b, DAY) }]);
      await raw.db(database).collection("usage_log").replaceOne({ _id: doc._id }, { slot: doc.slot, seq: doc.seq, rows: allThree });
      await s.writeUsage(batchOf(keys, 3), { writer: "w-j", seq: 2 });
      const second = await raw.db(database).collection("usage_log").findOne({ seq: { $gt: doc.seq as number } });
      await raw.db(database).collection("usage_log").replaceOne({ _id: second!._id }, { slot: second!.slot, seq: second!.seq, i: second!.i, k: second!.k, data: JSON.stringify(allThree.map((r) => ({ ...r, n: [3, 3, 0, 0, 0, 0, 0, 0, 0] }))) });
      expect(await identityTotal(s)).toBe(20);
      expect(await identityTotal(s, "hour")).toBe(20);
      expect(
        (await s.queryUsage({ by: { keyId: keys[1] }, granularity: "minute", start: 0, end: Date.now() + DAY, tagged: false, maxRows: 100 })).map((r) => r.counts.total),
      ).toEqual([5]);
      await s.rollUpUsage();
      expect(await logCount(database)).toBe(0);
      expect(await identityTotal(s)).toBe(20);
      expect(await identityTotal(s, "hour")).toBe(20);
      expect(await identityTotal(s, "minute")).toBe(20);
    } finally {
      await s.close();
    }
  });

  it("reads and replaces the single-row versions written before packs, counting each row once", async () => {
    const database = fresh();
    const s = await open(database);
    try {
      const keys = Array.from({ length: 5 }, (_, i) => `key_${unique(`v${i}`)}`);
      await s.writeUsage(batchOf(keys, 3), { writer: "w-v", seq: 1 });
      await s.rollUpUsage();
      // The same rows as the earlier shape: one document per row version (`<row id>#<seq>`, r, s, seq, counters as fields).
      const usage = raw.db(database).collection("usage");
      const legacy = (await usage.find({}).toArray()).flatMap((p) =>
        (JSON.parse(p.data as string) as { k: string; i: string | null; t: string; n: number[] }[]).map((r) => {
          const id = `${p.s}|${p.g}|${p.b}|${r.k}|${r.i ?? ""}|${r.t}`;
          return { _id: `${id}#${p.seq}`, r: id, s: p.s, seq: p.seq, g: p.g, b: p.b, k: r.k, i: r.i, tag: r.t, total: r.n[0], valid: r.n[1] } as Record<string, unknown>;
        }),
      );
      await usage.deleteMany({});
      await usage.insertMany(legacy as never[]);
      expect(await identityTotal(s)).toBe(15);
      expect(
        (await s.queryUsage({ by: { keyId: keys[2] }, granularity: "minute", start: 0, end: Date.now() + DAY, tagged: false, maxRows: 100 })).map((r) => r.counts.total),
      ).toEqual([3]);
      // A new process (nothing known in memory) rolls the next batch up over them: packs replace them.
      await s.close();
      const next = await open(database);
      try {
        await next.writeUsage(batchOf(keys, 2), { writer: "w-v", seq: 2 });
        await next.rollUpUsage();
        expect(await usage.countDocuments({ data: { $exists: false } })).toBe(0);
        expect(await identityTotal(next)).toBe(25);
        expect(await identityTotal(next, "minute")).toBe(25);
      } finally {
        await next.close();
      }
    } finally {
      await s.close();
    }
  });

  it("rolls the log up by itself every usageRollupMs, without a close or a call", async () => {
    const database = fresh();
    const s = await open(database, { usageRollupMs: 200 });
    try {
      const keys = Array.from({ length: 5 }, (_, i) => `key_${unique(`t${i}`)}`);
      await s.writeUsage(batchOf(keys, 3), { writer: "w-t", seq: 1 });
      // Polled, not slept: the timer's roll-up empties the log and writes the rows.
      const deadline = Date.now() + 15_000;
      while ((await logCount(database)) > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
      expect(await logCount(database)).toBe(0);
      expect(await rowCount(database)).toBe(15);
      expect(await identityTotal(s)).toBe(15);
    } finally {
      await s.close();
    }
  });

  it("leaves the older versions the timer's roll-ups replace for one delete later (on FerretDB each delete is a pass over the usage collection); reads stay exact meanwhile", async () => {
    const untilRolled = async (s: MongoStore, database: string) => {
      // Polled, not slept: the timer's roll-up empties the log.
      const deadline = Date.now() + 15_000;
      while ((await logCount(database)) > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      expect(await logCount(database)).toBe(0);
      // The roll-up that emptied the log may still be deleting older versions: wait for it.
      await (s as unknown as { usagePart: { rolling: Promise<void> | null } }).usagePart.rolling;
    };
    for (const deferMs of [600_000, 0]) {
      const database = fresh();
      const s = await open(database, { usageRollupMs: 50, usageSupersededDeleteMs: deferMs });
      try {
        const keys = Array.from({ length: 10 }, (_, i) => `key_${unique(`d${i}`)}`);
        await s.writeUsage(batchOf(keys, 1), { writer: "w-d", seq: 1 });
        await untilRolled(s, database);
        expect(await rowCount(database)).toBe(30); // 10 keys × minute, hour, day
        for (let seq = 2; seq <= 4; seq++) {
          await s.writeUsage(batchOf(keys, seq), { writer: "w-d", seq });
          await untilRolled(s, database);
          // Deferred: every version so far is still there; the reads take each row's newest.
          expect(await rowCount(database), `deleting after ${deferMs} ms`).toBe(deferMs > 0 ? 30 * seq : 30);
          expect(await identityTotal(s)).toBe(10 * ((seq * (seq + 1)) / 2));
          expect(await identityTotal(s, "minute")).toBe(10 * ((seq * (seq + 1)) / 2));
        }
        // An explicit roll-up deletes what was left at once.
        await s.rollUpUsage();
        expect(await rowCount(database)).toBe(30);
        expect(await identityTotal(s)).toBe(100);
      } finally {
        await s.close();
      }
    }
  });

  it("prunes a granularity again only once another bucket crossed the line, or rows below it were written since", async () => {
    const database = fresh();
    const s = await open(database, { monitorCommands: true });
    let prunes = 0;
    s.client.on("commandStarted", (e) => {
      if (e.commandName === "delete" && e.command.delete === "usage" && Object.keys((e.command.deletes as { q: object }[])[0]!.q).includes("g")) prunes++;
    });
    try {
      const hour = floorTo(AT, HOUR) - 10 * HOUR;
      await s.pruneUsage("hour", hour + 5 * MINUTE);
      await s.pruneUsage("hour", hour + 15 * MINUTE); // the same hour buckets are below both lines
      expect(prunes).toBe(1);
      await s.pruneUsage("hour", hour + HOUR + MINUTE); // the next hour's bucket crossed
      expect(prunes).toBe(2);
      // A batch counting in a bucket below the line: the next prune runs, and takes its hour rows.
      const keys = [`key_${unique("p")}`];
      await s.writeUsage(batchOf(keys, 4, hour - HOUR), { writer: "w-p", seq: 1 });
      await s.pruneUsage("hour", hour + HOUR + 2 * MINUTE);
      expect(prunes).toBe(3);
      expect(await identityTotal(s, "hour")).toBe(0);
      expect(await identityTotal(s, "minute")).toBe(4);
    } finally {
      await s.close();
    }
  });

  it("sums the batches of a roll-up into one increment per row", async () => {
    const database = fresh();
    const s = await open(database, { monitorCommands: true });
    const ops: unknown[] = [];
    s.client.on("commandStarted", (e) => {
      if (e.commandName === "insert" && e.command.insert === "usage") ops.push(...(e.command.documents as unknown[]));
    });
    try {
      const keys = Array.from({ length: 10 }, (_, i) => `key_${unique(`s${i}`)}`);
      for (let seq = 1; seq <= 5; seq++) await s.writeUsage(batchOf(keys, seq), { writer: "w-s", seq });
      await s.rollUpUsage();
      // 10 keys × (minute, hour, day), not × 5 batches: one pack per bucket, 10 rows each.
      expect((ops as { data: string }[]).map((p) => (JSON.parse(p.data) as unknown[]).length)).toEqual([10, 10, 10]);
      expect(await rowCount(database)).toBe(30);
      expect(await identityTotal(s)).toBe(10 * (1 + 2 + 3 + 4 + 5));
      // The next roll-up starts from the rows this one left (no read of the usage collection), and stays exact.
      const finds: string[] = [];
      s.client.on("commandStarted", (e) => {
        if (e.commandName === "find") finds.push(String(e.command.find));
      });
      await s.writeUsage(batchOf(keys, 7), { writer: "w-s", seq: 6 });
      await s.rollUpUsage();
      expect(finds.filter((c) => c === "usage")).toEqual([]);
      expect(await rowCount(database)).toBe(30);
      expect(await identityTotal(s)).toBe(10 * (1 + 2 + 3 + 4 + 5 + 7));
      expect(await identityTotal(s, "minute")).toBe(10 * (1 + 2 + 3 + 4 + 5 + 7));
    } finally {
      await s.close();
    }
  });

  it("finishes a roll-up that failed half-way by running it again, counting once, and reads stay exact in between", async () => {
    const database = fresh();
    const s = await openStoppingOnce(database);
    try {
      const keys = Array.from({ length: 60 }, (_, i) => `key_${unique(`f${i}`)}`); // 120 rows: three chunks of 50
      await s.writeUsage(batchOf(keys, 2), { writer: "w-f", seq: 1 });
      await expect(s.rollUpUsage()).rejects.toThrow(/injected/);
      expect(await rowCount(database)).toBe(50); // half-way: the first chunk applied, the log still there
      expect(await logCount(database)).toBe(1);
      expect(await identityTotal(s)).toBe(120);
      expect(await identityTotal(s, "minute")).toBe(120);
      // A batch written meanwhile is not part of the unfinished roll-up, and is counted once too.
      await s.writeUsage(batchOf(keys.slice(0, 10), 1), { writer: "w-f", seq: 2 });
      await s.rollUpUsage();
      expect(await logCount(database)).toBe(0);
      expect(await identityTotal(s)).toBe(130);
      expect(await identityTotal(s, "minute")).toBe(130);
    } finally {
      await s.close();
    }
  });

  it("applies a retried batch that never reached the log after the roll-up left unfinished, not before it", async () => {
    const database = fresh();
    const s = await openStoppingOnce(database);
    const log = (s as unknown as { usageLog: { insertMany: (...a: unknown[]) => Promise<unknown> } }).usageLog;
    const insertMany = log.insertMany.bind(log);
    try {
      const keys = Array.from({ length: 60 }, (_, i) => `key_${unique(`u${i}`)}`);
      await s.writeUsage(batchOf(keys, 1), { writer: "w-u", seq: 1 });
      await expect(s.rollUpUsage()).rejects.toThrow(/injected/); // 50 of 120 rows at the roll-up's seq
      // The next batch's insert fails without landing (the store went away); the recorder sends it again.
      log.insertMany = async () => {
        throw Object.assign(new Error("injected: connection closed"), { name: "MongoNetworkError" });
      };
      await expect(s.writeUsage(batchOf(keys, 2), { writer: "w-u", seq: 2 })).rejects.toThrow(/MongoNetworkError/);
      log.insertMany = insertMany;
      await s.writeUsage(batchOf(keys, 2), { writer: "w-u", seq: 2 });
      expect(await identityTotal(s)).toBe(60 * 3);
      await s.rollUpUsage();
      expect(await logCount(database)).toBe(0);
      expect(await identityTotal(s)).toBe(60 * 3);
      expect(await identityTotal(s, "minute")).toBe(60 * 3);
    } finally {
      log.insertMany = insertMany;
      await s.close();
    }
  });

  it("lets the slot's next owner apply the log of a process that died half-way through a roll-up, once", async () => {
    const database = fresh();
    const dead = await open(database, {
      usageLeaseMs: 400,
      usageRollupChunk: 50,
      usageRollupAfterChunk: (applied) => {
        if (applied >= 50) throw new Error("injected: the process dies here");
      },
    });
    const keys = Array.from({ length: 60 }, (_, i) => `key_${unique(`d${i}`)}`);
    await dead.writeUsage(batchOf(keys, 1), { writer: "w-dead", seq: 1 });
    await dead.writeUsage(batchOf(keys, 2), { writer: "w-dead", seq: 2 });
    await expect(dead.rollUpUsage()).rejects.toThrow(/injected/);
    // A crash: the connection goes, the lease is never given back, nothing more is written.
    await dead.client.close(true);
    expect(await rowCount(database)).toBe(50);

    await new Promise((r) => setTimeout(r, 500)); // the lease runs out
    const next = await open(database, { usageLeaseMs: 400, usageRollupChunk: 50 });
    try {
      expect(await identityTotal(next)).toBe(60 * 3);
      await next.writeUsage(batchOf(keys.slice(0, 1), 10), { writer: "w-next", seq: 1 }); // takes the dead process's slot over
      expect(await raw.db(database).collection("usage_writers").countDocuments({ _id: { $regex: "^w[0-9]+$" } } as never)).toBe(1);
      await next.rollUpUsage();
      expect(await logCount(database)).toBe(0);
      expect(await identityTotal(next)).toBe(60 * 3 + 10);
      expect(await identityTotal(next, "minute")).toBe(60 * 3 + 10);
    } finally {
      await next.close();
    }
  });
});
