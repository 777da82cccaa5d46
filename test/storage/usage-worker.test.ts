/**
 * The embedded store writes usage in a worker thread. When that thread dies, the
 * writes it had in hand fail as UNAVAILABLE (the recorder keeps and retries
 * them), the next write starts a new worker, and a retried batch still counts once.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Worker } from "node:worker_threads";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { UnavailableError } from "../../src/domain/errors.js";
import { SqliteStore } from "../../src/storage/embedded/sqlite-store.js";
import { emptyCounts, type UsageRow } from "../../src/domain/usage.js";
import { keyRecord } from "../support/records.js";

describe("embedded store usage worker", () => {
  let dir: string;
  let store: SqliteStore;
  const worker = () => (store as unknown as { usage: { worker: Worker | null } }).usage.worker;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "latchkey-usage-worker-"));
    store = new SqliteStore(join(dir, "latchkey.db"));
    await store.init();
  });
  afterAll(async () => {
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  });

  const bucket = Math.floor(Date.now() / 60_000) * 60_000;
  const rows = (n: number): UsageRow[] =>
    Array.from({ length: n }, (_, i) => ({ granularity: "minute", bucket, keyId: `key_${i}`, identityId: "id_w", tag: "", counts: { ...emptyCounts(), total: 1, valid: 1 } }));
  const identityTotal = async () =>
    (await store.queryUsage({ by: { identityId: "id_w" }, granularity: "minute", start: 0, end: bucket + 60_000, tagged: false, maxRows: 10_000 })).reduce((n, r) => n + r.counts.total, 0);

  it("fails the write in hand as UNAVAILABLE when the worker dies, then restarts it and counts the retried batch once", async () => {
    await store.writeUsage(rows(10), { writer: "w", seq: 1 });
    expect(await identityTotal()).toBe(10);
    const first = worker();
    expect(first).not.toBeNull();

    const batch = rows(5000);
    const inHand = store.writeUsage(batch, { writer: "w", seq: 2 });
    await first!.terminate();
    await expect(inHand).rejects.toBeInstanceOf(UnavailableError);

    // The recorder retries the same batch; whether or not the dead worker committed it, it counts once.
    await store.writeUsage(batch, { writer: "w", seq: 2 });
    await store.writeUsage(batch, { writer: "w", seq: 2 });
    expect(worker()).not.toBe(first);
    expect(await identityTotal()).toBe(5010);
  });

  it("writes last-used times in the worker, never moving them back", async () => {
    await store.createKey(keyRecord({ id: "key_lastused" }).record);
    await store.touchLastUsed(new Map([["key_lastused", 2000]]));
    await store.touchLastUsed(new Map([["key_lastused", 1000]]));
    expect((await store.getKey("key_lastused"))?.lastUsedAt).toBe(2000);
  });
});
