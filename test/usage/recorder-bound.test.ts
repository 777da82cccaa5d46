/**
 * Counting keeps bounded memory: while the store cannot be written, the failed
 * batch is kept as it was and new pending entries stop growing at `maxPending`;
 * further new (minute, key, tag) entries are dropped and reported through
 * onDrop, entries already pending still count, and everything kept is written
 * once the store is back.
 */
import { Writable } from "node:stream";
import { describe, expect, it } from "vitest";
import type { KeyRecord } from "../../src/domain/types.js";
import type { Verification, VerifyInput } from "../../src/domain/verify.js";
import { createLogger } from "../../src/observability/logger.js";
import type { Store } from "../../src/storage/store.js";
import { createUsageRecorder } from "../../src/usage/recorder.js";
import type { UsageRow } from "../../src/domain/usage.js";

const quiet = createLogger("silent", new Writable({ write: (_c, _e, cb) => cb() }));
const input: VerifyInput = { key: "k", apiId: "api", permissions: "", ratelimits: [], cost: null, tags: [] };
const verification = (keyId: string): Verification => ({
  code: "VALID",
  key: { id: keyId, identityId: "id_1" } as KeyRecord,
  identity: null,
  creditsRemaining: null,
  ratelimits: [],
  spent: 0,
});

describe("usage recorder memory bound", () => {
  it("drops new entries past maxPending while the store fails, keeps counting the pending ones, and writes them when it is back", async () => {
    let down = true;
    const written: UsageRow[] = [];
    const store = {
      writeUsage: async (rows: UsageRow[]) => {
        if (down) throw new Error("store down");
        written.push(...rows);
      },
      touchLastUsed: async () => {},
      pruneUsage: async () => {},
    } as unknown as Store;
    let dropped = 0;
    const recorder = createUsageRecorder({
      store,
      logger: quiet,
      options: { flushMs: 60_000, maxPending: 3, minuteRetentionMs: 3_600_000, hourRetentionMs: 86_400_000 },
      onDrop: (n) => (dropped += n),
    });
    const at = Date.UTC(2026, 10, 23, 12, 0, 30);
    for (const k of ["key_a", "key_b", "key_c"]) recorder.record(verification(k), input, at);
    await expect(recorder.flush()).rejects.toThrow("store down");
    expect(recorder.pendingEntries()).toBe(3); // the failed batch: three keys' minute rows

    // New entries while the failed batch waits (it is kept apart, as one batch):
    // up to maxPending of them, then new ones are dropped; a pending one still counts.
    for (const k of ["key_a", "key_d", "key_e", "key_f", "key_g"]) recorder.record(verification(k), input, at);
    recorder.record(verification("key_d"), input, at);
    expect(dropped).toBe(2);
    expect(recorder.pendingEntries()).toBe(3 + 3);

    down = false;
    await recorder.flush();
    expect(recorder.pendingEntries()).toBe(0);
    const minuteTotals = new Map<string, number>();
    expect(new Set(written.map((r) => r.granularity))).toEqual(new Set(["minute"]));
    for (const r of written) minuteTotals.set(r.keyId, (minuteTotals.get(r.keyId) ?? 0) + r.counts.total);
    expect(Object.fromEntries(minuteTotals)).toEqual({ key_a: 2, key_b: 1, key_c: 1, key_d: 2, key_e: 1 });
  });
});
