/**
 * The usage methods of every store (writeUsage, queryUsage, touchLastUsed,
 * pruneUsage): a batch is applied at most once per writer and seq, concurrent
 * writers lose nothing, queries honour identity/key, granularity, range and
 * tags, old minute and hour rows are pruned while day rows stay, and
 * last-used times only move forward. Then retention end to end: pruned minute
 * buckets, kept day buckets, and the MINUTE query past retention refused.
 */
import { Code } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Store } from "../../src/storage/store.js";
import { COUNTERS, emptyCounts, type Counts, type Granularity, type UsageRow } from "../../src/domain/usage.js";
import { openTestStore, rpcError, unique, type TestStore } from "../support/harness.js";
import { counts, DAY, describeEachStore, floorTo, HOUR, identityUsage, keyUsage, MINUTE, recordAt, rawUsageFields, useUsageHarness } from "./support.js";

function row(g: Granularity, bucket: number, keyId: string, identityId: string | null, tag: string, c: Partial<Counts>): UsageRow {
  return { granularity: g, bucket, keyId, identityId, tag, counts: { ...emptyCounts(), ...c } };
}


function total(rows: UsageRow[]): Counts {
  const out = emptyCounts();
  for (const r of rows) for (const c of COUNTERS) out[c] += r.counts[c];
  return out;
}

describeEachStore("store usage methods", (kind) => {
  let ts: TestStore;
  const store = (): Store => ts.store;
  beforeAll(async () => {
    ts = await openTestStore(kind);
  });
  afterAll(async () => {
    await ts?.destroy();
  });

  /** The verifications of one minute as the recorder writes them: a minute row (the store derives its hour and day rows). */
  const rolledUp = (at: number, keyId: string, identityId: string | null, c: Partial<Counts>, tag = "") => [row("minute", floorTo(at, MINUTE), keyId, identityId, tag, c)];
  const ids = () => ({ keyId: `key_${unique("k")}`, identityId: `id_${unique("i")}` });
  /** Writer ids are per process in real use: each test has its own. */
  const writer = (name: string) => unique(`writer-${name}`);
  const read = (by: { identityId: string } | { keyId: string }, g: Granularity, tagged = false, start = 0, end = Date.now() + 2 * DAY) =>
    store().queryUsage({ by, granularity: g, start, end, tagged, maxRows: 10_000 });

  it("applies a batch once: writing the same writer and seq again adds nothing", async () => {
    const { keyId, identityId } = ids();
    const now = Date.now();
    const w1 = writer("1");
    const batch = [...rolledUp(now, keyId, identityId, { total: 3, valid: 2, rateLimited: 1, creditsSpent: 5 }), ...rolledUp(now, keyId, identityId, { total: 1, valid: 1 }, "t")];
    await store().writeUsage(batch, { writer: w1, seq: 1 });
    await store().writeUsage(batch, { writer: w1, seq: 1 });
    for (const g of ["minute", "hour", "day"] as const) {
      expect(total(await read({ keyId }, g)), g).toEqual(counts({ total: 3, valid: 2, rateLimited: 1, creditsSpent: 5 }));
      expect(total(await read({ identityId }, g, true)), g).toEqual(counts({ total: 1, valid: 1 }));
    }
  });

  it("adds a later batch of the same writer and a batch of another writer", async () => {
    const { keyId, identityId } = ids();
    const now = Date.now();
    const [w1, w2] = [writer("1"), writer("2")];
    await store().writeUsage(rolledUp(now, keyId, identityId, { total: 1, valid: 1 }), { writer: w1, seq: 1 });
    await store().writeUsage(rolledUp(now, keyId, identityId, { total: 2, disabled: 2 }), { writer: w1, seq: 2 });
    await store().writeUsage(rolledUp(now, keyId, identityId, { total: 4, expired: 4 }), { writer: w2, seq: 1 });
    await store().writeUsage(rolledUp(now, keyId, identityId, { total: 4, expired: 4 }), { writer: w2, seq: 1 });
    for (const g of ["minute", "hour", "day"] as const) {
      expect(total(await read({ identityId }, g)), g).toEqual(counts({ total: 7, valid: 1, disabled: 2, expired: 4 }));
    }
  });

  if (kind === "mongodb") {
    it("applies the rest of a batch that failed half-way, once per row", async () => {
      const { keyId, identityId } = ids();
      const now = Date.now();
      const batch = [...rolledUp(now, keyId, identityId, { total: 2, valid: 2 }), ...rolledUp(now, keyId, identityId, { total: 1, valid: 1 }, "x")];
      // The first attempt wrote only some rows; the retry (same id) writes them all.
      const w1 = writer("1");
      await store().writeUsage(batch.slice(0, 1), { writer: w1, seq: 7 });
      await store().writeUsage(batch, { writer: w1, seq: 7 });
      for (const g of ["minute", "hour", "day"] as const) {
        expect(total(await read({ keyId }, g)), g).toEqual(counts({ total: 2, valid: 2 }));
        expect(total(await read({ keyId }, g, true)), g).toEqual(counts({ total: 1, valid: 1 }));
      }
    });
  }

  if (kind === "embedded") {
    it("applies a large batch whole and once, and the next batch of the writer whole", async () => {
      const identityId = `id_${unique("i")}`;
      const now = Date.now();
      const keyIds = Array.from({ length: 600 }, (_, i) => `key_${unique(`k${i}`)}`);
      const batch = keyIds.map((k, i) => row("minute", floorTo(now, MINUTE), k, identityId, "", { total: 1, valid: 1, creditsSpent: i }));
      const w1 = writer("1");
      await store().writeUsage(batch, { writer: w1, seq: 3 });
      await store().writeUsage(batch, { writer: w1, seq: 3 });
      const spent = (600 * 599) / 2;
      expect(total(await read({ identityId }, "minute"))).toEqual(counts({ total: 600, valid: 600, creditsSpent: spent }));
      for (const i of [0, 299, 599]) expect(total(await read({ keyId: keyIds[i] }, "minute"))).toEqual(counts({ total: 1, valid: 1, creditsSpent: i }));
      await store().writeUsage(batch, { writer: w1, seq: 4 });
      expect(total(await read({ identityId }, "minute"))).toEqual(counts({ total: 1200, valid: 1200, creditsSpent: 2 * spent }));
    });
  }

  it("loses nothing when several writers add to the same rows at once", async () => {
    const { keyId, identityId } = ids();
    const now = Date.now();
    const writers = [writer("a"), writer("b"), writer("c")];
    const batches = 15;
    await Promise.all(
      writers.map(async (w) => {
        for (let seq = 1; seq <= batches; seq++) {
          await store().writeUsage([...rolledUp(now, keyId, identityId, { total: 1, valid: 1 }), ...rolledUp(now, keyId, identityId, { total: 1, valid: 1 }, "t")], { writer: w, seq });
        }
      }),
    );
    for (const g of ["minute", "hour", "day"] as const) {
      expect(total(await read({ identityId }, g)).total, g).toBe(writers.length * batches);
      expect(total(await read({ keyId }, g, true)).total, g).toBe(writers.length * batches);
    }
  });

  it("reads rows of one identity or key, of one granularity, in [start, end), tagged or not", async () => {
    const a = ids();
    const b = ids();
    const t0 = floorTo(Date.now(), HOUR) - 3 * HOUR;
    await store().writeUsage(
      [
        row("minute", t0, a.keyId, a.identityId, "", { total: 1 }),
        row("minute", t0 + HOUR, a.keyId, a.identityId, "", { total: 2 }),
        row("minute", t0 + 2 * HOUR, a.keyId, a.identityId, "", { total: 4 }),
        row("minute", t0 + HOUR, a.keyId, a.identityId, "red", { total: 8 }),
        row("minute", t0 + HOUR + 5 * MINUTE, a.keyId, a.identityId, "", { total: 16 }),
        row("minute", t0 + HOUR, b.keyId, b.identityId, "", { total: 32 }),
        row("minute", t0 + HOUR, b.keyId, null, "", { total: 64 }),
      ],
      { writer: writer("w"), seq: 1 },
    );
    const hourA = await read({ identityId: a.identityId }, "hour", false, t0 + HOUR, t0 + 2 * HOUR);
    expect(hourA.map((r) => [r.bucket, r.keyId, r.identityId, r.tag, r.counts.total])).toEqual([[t0 + HOUR, a.keyId, a.identityId, "", 18]]);
    expect(total(await read({ identityId: a.identityId }, "hour", false, t0, t0 + 3 * HOUR)).total).toBe(23);
    expect((await read({ identityId: a.identityId }, "hour", true)).map((r) => [r.tag, r.counts.total])).toEqual([["red", 8]]);
    const minutesA = await read({ identityId: a.identityId }, "minute", false, t0 + HOUR, t0 + 2 * HOUR);
    expect(minutesA.map((r) => [r.bucket, r.counts.total])).toEqual([[t0 + HOUR, 2], [t0 + HOUR + 5 * MINUTE, 16]]);
    expect(total(await read({ keyId: b.keyId }, "hour")).total).toBe(96);
    expect(total(await read({ identityId: b.identityId }, "hour")).total).toBe(32);
    const noIdentity = (await read({ keyId: b.keyId }, "hour")).find((r) => r.counts.total === 64)!;
    expect(noIdentity.identityId).toBeNull();
  });

  it("refuses to read more rows than asked for, naming start_time", async () => {
    const { keyId, identityId } = ids();
    const t0 = floorTo(Date.now(), MINUTE) - 10 * MINUTE;
    await store().writeUsage(
      Array.from({ length: 5 }, (_, i) => row("minute", t0 + i * MINUTE, keyId, identityId, "", { total: 1 })),
      { writer: writer("w"), seq: 1 },
    );
    const q = { by: { keyId }, granularity: "minute" as const, start: t0, end: t0 + HOUR, tagged: false };
    expect(await store().queryUsage({ ...q, maxRows: 5 })).toHaveLength(5);
    await expect(store().queryUsage({ ...q, maxRows: 4 })).rejects.toMatchObject({ field: "start_time" });
  });

  it("prunes minute rows before the cut and hour rows before theirs, and keeps day rows", async () => {
    const { keyId, identityId } = ids();
    const now = Date.now();
    const old = now - 3 * DAY;
    const batch = [...rolledUp(old, keyId, identityId, { total: 5, valid: 5 }), ...rolledUp(now, keyId, identityId, { total: 1, valid: 1 }), ...rolledUp(old, keyId, identityId, { total: 2, valid: 2 }, "t")];
    await store().writeUsage(batch, { writer: writer("w"), seq: 1 });

    await store().pruneUsage("minute", now - 2 * DAY);
    expect((await read({ keyId }, "minute")).map((r) => r.bucket)).toEqual([floorTo(now, MINUTE)]);
    expect(await read({ keyId }, "minute", true)).toEqual([]);
    expect(total(await read({ keyId }, "hour")).total).toBe(6);
    expect(total(await read({ keyId }, "day")).total).toBe(6);

    await store().pruneUsage("hour", now - 2 * DAY);
    expect((await read({ keyId }, "hour")).map((r) => r.bucket)).toEqual([floorTo(now, HOUR)]);
    expect(await read({ keyId }, "hour", true)).toEqual([]);
    expect(total(await read({ identityId }, "day")).total).toBe(6);
    expect(total(await read({ identityId }, "day", true)).total).toBe(2);
  });

  it("raises last_used_at, never lowers it, and ignores keys it does not know", async () => {
    const now = Date.now();
    const key = {
      id: `key_${unique("lu")}`,
      apiId: "api_usage",
      identityId: null,
      name: "",
      meta: {},
      start: "sk_x",
      hash: unique("hash"),
      enabled: true,
      expiresAt: null,
      credits: null,
      ratelimits: [],
      permissions: [],
      createdAt: now,
      updatedAt: now,
      lastUsedAt: null,
    };
    await store().createKey(key as never);
    const unknown = `key_${unique("none")}`;
    await store().touchLastUsed(new Map([[key.id, now], [unknown, now]]));
    expect((await store().getKey(key.id))!.lastUsedAt).toBe(now);
    await store().touchLastUsed(new Map([[key.id, now - 1000]]));
    expect((await store().getKey(key.id))!.lastUsedAt).toBe(now);
    await store().touchLastUsed(new Map([[key.id, now + 1000]]));
    expect((await store().getKey(key.id))!.lastUsedAt).toBe(now + 1000);
    expect(await store().getKey(unknown)).toBeNull();
  });
});

describeEachStore("usage retention", (kind) => {
  const h = useUsageHarness(kind);

  it("prunes old minute buckets while hour and day buckets keep the counts", async () => {
    const c = h().admin;
    const { identity } = await c.identities.createIdentity({ externalId: unique("org") });
    const key = (await c.keys.createKey({ apiId: "api_usage", identity: { case: "identityId", value: identity!.id } })).key!;
    const old = Date.now() - 3 * DAY;
    await recordAt(h(), key.id, old, 4);
    await h().core.recorder.flush();
    const minuteRows = () => h().store.queryUsage({ by: { keyId: key.id }, granularity: "minute", start: old - HOUR, end: old + HOUR, tagged: false, maxRows: 100 });
    expect(total(await minuteRows()).total).toBe(4);

    await h().store.pruneUsage("minute", Date.now() - 48 * HOUR);
    expect(await minuteRows()).toEqual([]);
    expect((await identityUsage(c, { id: identity!.id }, { granularity: "DAY", start: old - DAY })).totals).toEqual(counts({ total: 4, valid: 4 }));
    expect((await keyUsage(c, key.id, { granularity: "HOUR", start: old - HOUR, end: old + HOUR })).totals).toEqual(counts({ total: 4, valid: 4 }));

    // Minute buckets that old are gone by design: the query says so rather than answering zeros.
    const err = await rpcError(c.keys.getKeyUsage({ id: key.id, ...rawUsageFields({ granularity: "MINUTE", start: old - HOUR, end: old + HOUR }) }));
    expect(Code[err.code]).toBe("InvalidArgument");
    expect(err.rawMessage).toMatch(/^start_time: /);
  });
});

describe("usage retention setting", () => {
  const h = useUsageHarness("embedded", { coreOptions: { usageMinuteRetentionHours: 2 } });

  it("refuses a MINUTE range starting before the configured minute retention, naming start_time", async () => {
    const c = h().admin;
    const key = (await c.keys.createKey({ apiId: "api_usage" })).key!;
    const ok = await keyUsage(c, key.id, { granularity: "MINUTE", start: Date.now() - HOUR });
    expect(ok.totals.total).toBe(0);
    const err = await rpcError(c.keys.getKeyUsage({ id: key.id, ...rawUsageFields({ granularity: "MINUTE", start: Date.now() - 3 * HOUR }) }));
    expect(Code[err.code]).toBe("InvalidArgument");
    expect(err.rawMessage).toMatch(/^start_time: .*2 hours/);
  });
});

describeEachStore("usage day retention setting", (kind) => {
  const h = useUsageHarness(kind, { coreOptions: { usageDayRetentionDays: 30 } });

  it("prunes day rows past LATCHKEY_USAGE_DAY_RETENTION_DAYS and refuses DAY ranges reaching before it, naming start_time", async () => {
    const c = h().admin;
    const key = (await c.keys.createKey({ apiId: "api_usage" })).key!;
    const old = Date.now() - 40 * DAY;
    const recent = Date.now() - 10 * DAY;
    await recordAt(h(), key.id, old, 3);
    await recordAt(h(), key.id, recent, 2);
    await h().core.recorder.flush();
    const dayRows = () => h().store.queryUsage({ by: { keyId: key.id }, granularity: "day", start: 0, end: Date.now() + DAY, tagged: false, maxRows: 100 });
    expect(total(await dayRows()).total).toBe(5);

    // What the recorder's prune does with the setting: day rows before the retention go.
    await h().store.pruneUsage("day", Date.now() - 30 * DAY);
    expect(total(await dayRows()).total).toBe(2);
    expect((await keyUsage(c, key.id, { granularity: "DAY", start: Date.now() - 20 * DAY })).totals).toEqual(counts({ total: 2, valid: 2 }));

    // A DAY range reaching before the retention is refused rather than answered with zeros.
    const err = await rpcError(c.keys.getKeyUsage({ id: key.id, ...rawUsageFields({ granularity: "DAY", start: Date.now() - 35 * DAY }) }));
    expect(Code[err.code]).toBe("InvalidArgument");
    expect(err.rawMessage).toMatch(/^start_time: day buckets are kept for 30 days/);
  });
});
