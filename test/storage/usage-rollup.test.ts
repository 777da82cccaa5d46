/**
 * The embedded store derives hour and day usage rows from minute rows
 * (src/storage/embedded/usage-rollup.ts): a flush writes minute rows only, a
 * roll-up sums the minutes before its watermark into hour and day rows once,
 * and reads of hours and days add the minutes not rolled up yet. Counts are
 * exact before, during and after a roll-up, for a late minute (below the
 * watermark), across an hour and a day boundary, for a database written by the
 * release that upserted hour and day rows with every flush, and when minute rows
 * are pruned.
 */
import Database from "better-sqlite3";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { SqliteStore } from "../../src/storage/embedded/sqlite-store.js";
import { emptyCounts, type Counts, type Granularity, type UsageRow } from "../../src/domain/usage.js";

const MINUTE = 60_000;
const HOUR = 60 * MINUTE;
const DAY = 24 * HOUR;

describe("embedded store: hour and day usage rows rolled up from minute rows", () => {
  let dir: string;
  let path: string;
  let store: SqliteStore;
  let seq = 0;
  beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), "latchkey-usage-rollup-"));
    path = join(dir, "latchkey.db");
    store = new SqliteStore(path);
    await store.init();
  });
  afterEach(async () => {
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  });

  const minute = (bucket: number, c: Partial<Counts>, tag = "", keyId = "key_r"): UsageRow => ({
    granularity: "minute",
    bucket,
    keyId,
    identityId: "id_r",
    tag,
    counts: { ...emptyCounts(), ...c },
  });
  const write = (rows: UsageRow[]) => store.writeUsage(rows, { writer: "w", seq: ++seq });
  const read = async (g: Granularity, start: number, end: number, tagged = false) =>
    (await store.queryUsage({ by: { identityId: "id_r" }, granularity: g, start, end, tagged, maxRows: 1000 })).map((r) => [r.bucket, r.tag, r.counts.total, r.counts.creditsSpent]);
  /** What is stored, read past the store: rows of one granularity, and the watermark. */
  const stored = (g: Granularity) => {
    const db = new Database(path, { readonly: true });
    try {
      return (db.prepare("SELECT bucket, tag, total FROM usage WHERE g = ? ORDER BY bucket, tag").all(g) as { bucket: number; tag: string; total: number }[]).map((r) => [r.bucket, r.tag, r.total]);
    } finally {
      db.close();
    }
  };
  const watermark = () => {
    const db = new Database(path, { readonly: true });
    try {
      return Number((db.prepare("SELECT value FROM settings WHERE name = 'usage_rolled_up_to'").get() as { value: string }).value);
    } finally {
      db.close();
    }
  };

  // Two minutes before a day ends, a day ahead: the worker's own roll-up (one
  // minute behind the clock) never reaches these minutes; rollUpUsage does.
  const F = Math.floor(Date.now() / DAY) * DAY + 2 * DAY - 2 * MINUTE;
  const [H1, H2] = [F - (F % HOUR), F + 2 * MINUTE];
  const [D1, D2] = [F - (F % DAY), F + 2 * MINUTE];

  it("counts hours and days exactly before the roll-up (from minute rows), after it (from hour and day rows), and once", async () => {
    await write([minute(F, { total: 1, creditsSpent: 10 }), minute(F + MINUTE, { total: 2 }), minute(F + MINUTE, { total: 4 }, "red")]);
    await write([minute(F + 2 * MINUTE, { total: 8 }), minute(F + 3 * MINUTE, { total: 16 })]);
    const hours = [[H1, "", 3, 10], [H2, "", 24, 0]];
    const days = [[D1, "", 3, 10], [D2, "", 24, 0]];
    expect(stored("hour")).toEqual([]);
    expect(await read("hour", H1, H2 + HOUR)).toEqual(hours);
    expect(await read("day", D1, D2 + DAY)).toEqual(days);
    expect(await read("hour", H1, H2 + HOUR, true)).toEqual([[H1, "red", 4, 0]]);
    expect(await read("hour", H2, H2 + HOUR)).toEqual([[H2, "", 24, 0]]);

    // Everything up to the minute before F + 3 minutes' minute.
    expect(await store.rollUpUsage(F + 4 * MINUTE + 30_000)).toBe(F + 3 * MINUTE);
    expect(stored("hour")).toEqual([[H1, "", 3], [H1, "red", 4], [H2, "", 8]]);
    expect(stored("day")).toEqual([[D1, "", 3], [D1, "red", 4], [D2, "", 8]]);
    expect(await read("hour", H1, H2 + HOUR)).toEqual(hours);
    expect(await read("day", D1, D2 + DAY)).toEqual(days);
    expect(await read("minute", F, F + 4 * MINUTE)).toEqual([[F, "", 1, 10], [F + MINUTE, "", 2, 0], [F + 2 * MINUTE, "", 8, 0], [F + 3 * MINUTE, "", 16, 0]]);

    // Again with nothing new: nothing moves and nothing is added twice.
    expect(await store.rollUpUsage(F + 4 * MINUTE + 30_000)).toBe(F + 3 * MINUTE);
    expect(await store.rollUpUsage(F + 10 * MINUTE)).toBe(F + 9 * MINUTE);
    expect(await read("hour", H1, H2 + HOUR)).toEqual(hours);
    expect(stored("hour")).toEqual([[H1, "", 3], [H1, "red", 4], [H2, "", 24]]);
  });

  it("counts a minute written after its roll-up (a late batch) in its hour and day rows at once", async () => {
    await write([minute(F, { total: 1 })]);
    await store.rollUpUsage(F + 5 * MINUTE);
    await write([minute(F, { total: 2 }), minute(F + 3 * MINUTE, { total: 4 }), minute(F + 4 * MINUTE, { total: 8 })]);
    // F and F + 3 minutes are below the watermark (F + 4 minutes): written to their hour and day rows with their minute rows.
    expect(stored("hour")).toEqual([[H1, "", 3], [H2, "", 4]]);
    expect(await read("hour", H1, H2 + HOUR)).toEqual([[H1, "", 3, 0], [H2, "", 12, 0]]);
    expect(await read("day", D1, D2 + DAY)).toEqual([[D1, "", 3, 0], [D2, "", 12, 0]]);
    await store.rollUpUsage(F + 6 * MINUTE);
    expect(await read("hour", H1, H2 + HOUR)).toEqual([[H1, "", 3, 0], [H2, "", 12, 0]]);
    expect(stored("day")).toEqual([[D1, "", 3], [D2, "", 12]]);
  });

  it("a batch written again (same writer and seq) after the roll-up adds nothing", async () => {
    const batch = [minute(F, { total: 5 })];
    await store.writeUsage(batch, { writer: "again", seq: 1 });
    await store.rollUpUsage(F + 5 * MINUTE);
    await store.writeUsage(batch, { writer: "again", seq: 1 });
    expect(await read("hour", H1, H1 + HOUR)).toEqual([[H1, "", 5, 0]]);
    expect(await read("minute", F, F + MINUTE)).toEqual([[F, "", 5, 0]]);
  });

  it("rolls up with each write the minutes over by a minute", async () => {
    const before = Date.now();
    await write([minute(Math.floor(before / MINUTE) * MINUTE - 10 * MINUTE, { total: 1 })]);
    const after = Date.now();
    const w = watermark();
    expect(w).toBeGreaterThanOrEqual(Math.floor(before / MINUTE) * MINUTE - MINUTE);
    expect(w).toBeLessThanOrEqual(Math.floor(after / MINUTE) * MINUTE - MINUTE);
    expect(stored("hour")).toHaveLength(1);
  });

  it("does not count twice a database written by the release that wrote hour and day rows with every flush", async () => {
    const M = Math.floor(Date.now() / MINUTE) * MINUTE;
    await store.close();
    // That release's rows: each flush upserted a minute, an hour and a day row; it kept no watermark.
    const db = new Database(path);
    db.prepare("DELETE FROM settings WHERE name = 'usage_rolled_up_to'").run();
    const insert = db.prepare("INSERT INTO usage VALUES (?, ?, 'key_r', 'id_r', '', ?, ?, 0, 0, 0, 0, 0, 0, 0) ON CONFLICT DO UPDATE SET total = total + excluded.total, valid = valid + excluded.valid");
    for (const [g, size] of [["minute", MINUTE], ["hour", HOUR], ["day", DAY]] as const) {
      insert.run(g, M - 30 * MINUTE - ((M - 30 * MINUTE) % size), 2, 2);
      insert.run(g, M - (M % size), 3, 3);
    }
    db.close();
    store = new SqliteStore(path);
    await store.init();
    expect(watermark()).toBe(M + MINUTE);
    const hourOf = (t: number) => t - (t % HOUR);
    const sameHour = hourOf(M) === hourOf(M - 30 * MINUTE);
    const expectHours = (atM: number) => (sameHour ? [[hourOf(M), "", 2 + atM, 0]] : [[hourOf(M - 30 * MINUTE), "", 2, 0], [hourOf(M), "", atM, 0]]);
    expect(await read("hour", 0, M + DAY)).toEqual(expectHours(3));
    // The same minute again, now: below the watermark, so written to its hour and day rows directly.
    await write([minute(M, { total: 4 })]);
    expect(await read("hour", 0, M + DAY)).toEqual(expectHours(7));
    expect((await read("day", 0, M + DAY)).reduce((n, r) => n + Number(r[2]), 0)).toBe(9);
    expect((await read("minute", 0, M + DAY)).reduce((n, r) => n + Number(r[2]), 0)).toBe(9);
  });

  it("never prunes minute rows that are not yet in their hour and day rows", async () => {
    await write([minute(F, { total: 1 }), minute(F + 3 * MINUTE, { total: 2 })]);
    // Minute rows before F + 10 minutes are past retention; none is rolled up yet (the clock is a day behind them).
    await store.pruneUsage("minute", F + 10 * MINUTE);
    expect(stored("minute")).toEqual([[F, "", 1], [F + 3 * MINUTE, "", 2]]);
    expect(await read("day", D1, D2 + DAY)).toEqual([[D1, "", 1, 0], [D2, "", 2, 0]]);
    await store.rollUpUsage(F + 5 * MINUTE);
    await store.pruneUsage("minute", F + 10 * MINUTE);
    expect(stored("minute")).toEqual([]);
    expect(await read("day", D1, D2 + DAY)).toEqual([[D1, "", 1, 0], [D2, "", 2, 0]]);
    expect(await read("hour", H1, H2 + HOUR)).toEqual([[H1, "", 1, 0], [H2, "", 2, 0]]);
  });

  it("opens a database while another connection holds its write lock (the CLI beside a running server's usage worker)", async () => {
    const holder = new Database(path);
    holder.exec("BEGIN IMMEDIATE");
    try {
      const beside = new SqliteStore(path);
      await beside.init();
      await beside.close();
    } finally {
      holder.exec("ROLLBACK");
      holder.close();
    }
  });

  it("refuses rows other than minute rows, writing nothing", async () => {
    await expect(store.writeUsage([minute(F, { total: 1 }), { ...minute(F, { total: 1 }), granularity: "hour", bucket: H1 }], { writer: "w", seq: 99 })).rejects.toThrow(/minute rows/);
    expect(stored("minute")).toEqual([]);
  });
});
