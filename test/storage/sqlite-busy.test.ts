/**
 * The embedded store while another connection holds SQLite's write lock (the
 * usage worker committing a flush, the CLI): a write waits for it off the event
 * loop, so every other call keeps being answered; it stops waiting when its
 * signal aborts. The lock is held by a second connection the test controls.
 */
import Database from "better-sqlite3";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { SqliteStore } from "../../src/storage/embedded/sqlite-store.js";
import { keyRecord } from "../support/records.js";

describe("embedded store under another connection's write lock", () => {
  let dir: string;
  let store: SqliteStore;
  let other: Database.Database;
  let keyId: string;

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), "latchkey-busy-"));
    store = new SqliteStore(join(dir, "latchkey.db"));
    await store.init();
    const k = keyRecord({ credits: { remaining: 5, refill: null } });
    await store.createKey(k.record);
    keyId = k.record.id;
    other = new Database(join(dir, "latchkey.db"));
    other.exec("BEGIN IMMEDIATE");
  });
  afterEach(async () => {
    if (other.inTransaction) other.exec("ROLLBACK");
    other.close();
    await store.close();
    await rm(dir, { recursive: true, force: true });
  });

  it("spends once the lock is released, without blocking the event loop meanwhile", async () => {
    let released = false;
    // Runs only if the event loop is free while the spend waits.
    setTimeout(() => {
      other.exec("COMMIT");
      released = true;
    }, 0);
    expect(await store.spendCredits({ keyId }, 1, null)).toMatchObject({ ok: true, remaining: 4 });
    expect(released).toBe(true);
  });

  it("answers reads while a spend waits for the lock", async () => {
    let settled = false;
    const spend = store.spendCredits({ keyId }, 1, null).finally(() => (settled = true));
    expect((await store.getKey(keyId))!.credits!.remaining).toBe(5);
    expect(settled).toBe(false);
    other.exec("COMMIT");
    expect(await spend).toMatchObject({ ok: true, remaining: 4 });
  });

  it("writes nothing when the spend's signal aborts while it waits", async () => {
    const call = new AbortController();
    const spend = store.spendCredits({ keyId }, 1, null, call.signal);
    setTimeout(() => call.abort(new Error("deadline passed")), 0);
    await expect(spend).rejects.toThrow("deadline passed");
    other.exec("COMMIT");
    expect((await store.getKey(keyId))!.credits!.remaining).toBe(5);
  });
});
