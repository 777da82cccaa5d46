/**
 * Usage counting: every verification of a known key is counted by outcome, per
 * key and per identity, with credits spent and tags, in minute, hour and day
 * buckets; counting stays off the hot path (nothing is written before a flush),
 * a flush or a graceful stop writes everything, a failed flush loses nothing
 * and double-counts nothing, and keys' last_used_at follows flushes and never
 * moves backwards. In process (test/support/harness.ts), on both stores.
 */
import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { describe, expect, it } from "vitest";
import { VerificationCode } from "../../gen/latchkey/v1/usage_pb.js";
import type { Clients, Harness } from "../support/harness.js";
import { createHarness, unique } from "../support/harness.js";
import { credits, limit } from "../verify/support.js";
import {
  counts,
  DAY,
  describeEachStore,
  failingStore,
  floorTo,
  HOUR,
  identityUsage,
  keyUsage,
  MINUTE,
  recordAt,
  sumCounts,
  useUsageHarness,
  type GranularityName,
  type PlainReport,
} from "./support.js";

const API = "api_usage";
const SIZE: Record<GranularityName, number> = { MINUTE, HOUR, DAY };

async function newIdentity(c: Clients): Promise<string> {
  const { identity } = await c.identities.createIdentity({ externalId: unique("org") });
  return identity!.id;
}

async function newKey(c: Clients, identityId: string | null, extra: Record<string, unknown> = {}): Promise<{ id: string; plaintext: string }> {
  const res = await c.keys.createKey({
    apiId: API,
    ...(identityId ? { identity: { case: "identityId" as const, value: identityId } } : {}),
    ...extra,
  });
  return { id: res.key!.id, plaintext: res.plaintext };
}

async function verifyCode(c: Clients, key: string, req: Record<string, unknown> = {}): Promise<string> {
  const res = await c.keys.verifyKey({ key, ...req });
  return VerificationCode[res.code];
}

/** Non-empty points of every series lie in the buckets of [from, to], and each series' points add up to its totals. */
function expectPointsWithin(r: PlainReport, g: GranularityName, from: number, to: number): void {
  for (const s of r.series) {
    expect(sumCounts(s.points.map((p) => p.counts))).toEqual(s.totals);
    for (const p of s.points) {
      if (p.counts.total > 0) {
        expect(p.time).toBeGreaterThanOrEqual(floorTo(from, SIZE[g]));
        expect(p.time).toBeLessThanOrEqual(floorTo(to, SIZE[g]));
      }
    }
  }
}

describeEachStore("usage counting", (kind) => {
  const h = useUsageHarness(kind);

  it("counts every outcome per key and per identity, with credits spent and tags, in minute, hour and day buckets", async () => {
    const c = h().admin;
    const identityId = await newIdentity(c);
    const paid = await newKey(c, identityId, { credits: credits(100) });
    const limited = await newKey(c, identityId, { ratelimits: [limit("per-minute", 1, MINUTE)] });
    const scarce = await newKey(c, identityId, { credits: credits(1) });
    const disabled = await newKey(c, identityId, { enabled: false });
    const expiring = await newKey(c, identityId);
    const narrow = await newKey(c, identityId, { permissions: ["read"] });
    await c.keys.updateKey({ key: { id: expiring.id, expiresAt: timestampFromMs(Date.now() - 1000) }, updateMask: { paths: ["expires_at"] } });

    const before = Date.now();
    const seen = [
      await verifyCode(c, paid.plaintext, { cost: 3n, tags: ["plan:pro", "route:/v1"] }),
      await verifyCode(c, paid.plaintext, { apiId: "api_other", tags: ["route:/v1"] }),
      await verifyCode(c, limited.plaintext),
      await verifyCode(c, limited.plaintext, { tags: ["plan:pro"] }),
      await verifyCode(c, scarce.plaintext),
      await verifyCode(c, scarce.plaintext),
      await verifyCode(c, disabled.plaintext),
      await verifyCode(c, expiring.plaintext),
      await verifyCode(c, narrow.plaintext, { permissions: "write" }),
    ];
    const after = Date.now();
    expect(seen).toEqual(["VALID", "NOT_FOUND", "VALID", "RATE_LIMITED", "VALID", "USAGE_EXCEEDED", "DISABLED", "EXPIRED", "INSUFFICIENT_PERMISSIONS"]);
    await h().core.recorder.flush();

    const perKey = {
      [paid.id]: counts({ total: 2, valid: 1, notFound: 1, creditsSpent: 3 }),
      [limited.id]: counts({ total: 2, valid: 1, rateLimited: 1 }),
      [scarce.id]: counts({ total: 2, valid: 1, usageExceeded: 1, creditsSpent: 1 }),
      [disabled.id]: counts({ total: 1, disabled: 1 }),
      [expiring.id]: counts({ total: 1, expired: 1 }),
      [narrow.id]: counts({ total: 1, insufficientPermissions: 1 }),
    };
    const identityTotals = counts({
      total: 9,
      valid: 3,
      notFound: 1,
      disabled: 1,
      expired: 1,
      insufficientPermissions: 1,
      rateLimited: 1,
      usageExceeded: 1,
      creditsSpent: 4,
    });
    expect(sumCounts(Object.values(perKey))).toEqual(identityTotals);

    for (const g of ["MINUTE", "HOUR", "DAY"] as const) {
      const range = { granularity: g, start: before - 2 * SIZE[g] };
      const ident = await identityUsage(c, { id: identityId }, range);
      expect(ident.totals, g).toEqual(identityTotals);
      expect(ident.series).toHaveLength(1);
      expect(ident.series[0].totals).toEqual(identityTotals);
      expectPointsWithin(ident, g, before, after);

      const byKey = await identityUsage(c, { id: identityId }, { ...range, groupBy: "KEY" });
      expect(Object.fromEntries(byKey.series.map((s) => [s.group, s.totals])), g).toEqual(perKey);
      expectPointsWithin(byKey, g, before, after);

      for (const [keyId, expected] of Object.entries(perKey)) {
        const k = await keyUsage(c, keyId, range);
        expect(k.totals, `${g} ${keyId}`).toEqual(expected);
        expectPointsWithin(k, g, before, after);
      }

      const byTag = await identityUsage(c, { id: identityId }, { ...range, groupBy: "TAG" });
      expect(Object.fromEntries(byTag.series.map((s) => [s.group, s.totals])), g).toEqual({
        "plan:pro": counts({ total: 2, valid: 1, rateLimited: 1, creditsSpent: 3 }),
        "route:/v1": counts({ total: 2, valid: 1, notFound: 1, creditsSpent: 3 }),
      });
      // Tags split the counts; the response totals still cover every verification.
      expect(byTag.totals).toEqual(identityTotals);
    }
  });

  it("counts a key without an identity under the key only", async () => {
    const c = h().admin;
    const loose = await newKey(c, null);
    expect(await verifyCode(c, loose.plaintext)).toBe("VALID");
    expect(await verifyCode(c, loose.plaintext, { apiId: "api_other" })).toBe("NOT_FOUND");
    await h().core.recorder.flush();
    expect((await keyUsage(c, loose.id)).totals).toEqual(counts({ total: 2, valid: 1, notFound: 1 }));
  });

  it("does not count a verification of a deleted key against its identity", async () => {
    const c = h().admin;
    const identityId = await newIdentity(c);
    const gone = await newKey(c, identityId);
    const kept = await newKey(c, identityId);
    await c.keys.deleteKey({ id: gone.id });
    expect(await verifyCode(c, gone.plaintext)).toBe("NOT_FOUND");
    expect(await verifyCode(c, kept.plaintext)).toBe("VALID");
    await h().core.recorder.flush();
    expect((await identityUsage(c, { id: identityId })).totals).toEqual(counts({ total: 1, valid: 1 }));
    expect((await keyUsage(c, gone.id)).totals).toEqual(counts({}));
  });

  it("counts a verification carrying the same tag twice once in that tag's series", async () => {
    const c = h().admin;
    const identityId = await newIdentity(c);
    const key = await newKey(c, identityId);
    expect(await verifyCode(c, key.plaintext, { tags: ["a", "a", "b"] })).toBe("VALID");
    await h().core.recorder.flush();
    const byTag = await identityUsage(c, { id: identityId }, { groupBy: "TAG" });
    expect(Object.fromEntries(byTag.series.map((s) => [s.group, s.totals.total]))).toEqual({ a: 1, b: 1 });
    expect(byTag.totals.total).toBe(1);
  });

  it("writes nothing until a flush, then everything once", async () => {
    const c = h().admin;
    const identityId = await newIdentity(c);
    const keys = [await newKey(c, identityId), await newKey(c, identityId)];
    const start = Date.now() - HOUR;
    for (let i = 0; i < 25; i++) expect(await verifyCode(c, keys[i % 2].plaintext)).toBe("VALID");

    const stored = () => h().store.queryUsage({ by: { identityId }, granularity: "minute", start, end: Date.now() + HOUR, tagged: false, maxRows: 1000 });
    expect(await stored()).toEqual([]);
    expect((await identityUsage(c, { id: identityId })).totals.total).toBe(0);
    expect(h().core.recorder.pendingEntries()).toBeGreaterThan(0);

    await h().core.recorder.flush();
    expect(h().core.recorder.pendingEntries()).toBe(0);
    expect((await identityUsage(c, { id: identityId })).totals).toEqual(counts({ total: 25, valid: 25 }));
    expect((await keyUsage(c, keys[0].id)).totals.total).toBe(13);
    expect((await keyUsage(c, keys[1].id)).totals.total).toBe(12);

    // A flush with nothing new writes nothing more.
    await h().core.recorder.flush();
    expect((await identityUsage(c, { id: identityId })).totals.total).toBe(25);
  });

  it("writes pending counts on a graceful stop", async () => {
    const c = h().admin;
    const identityId = await newIdentity(c);
    const key = await newKey(c, identityId);
    for (let i = 0; i < 7; i++) expect(await verifyCode(c, key.plaintext, { tags: ["t"] })).toBe("VALID");
    expect((await h().store.queryUsage({ by: { keyId: key.id }, granularity: "day", start: 0, end: Date.now() + DAY, tagged: false, maxRows: 10 })).length).toBe(0);

    await h().core.stop();
    const rows = await h().store.queryUsage({ by: { keyId: key.id }, granularity: "day", start: 0, end: Date.now() + DAY, tagged: false, maxRows: 10 });
    expect(sumCounts(rows.map((r) => r.counts))).toEqual(counts({ total: 7, valid: 7 }));
    const tagged = await h().store.queryUsage({ by: { identityId }, granularity: "minute", start: Date.now() - HOUR, end: Date.now() + HOUR, tagged: true, maxRows: 10 });
    expect(tagged.map((r) => [r.tag, r.counts.total])).toEqual([["t", 7]]);
  });

  it("keeps the counts of a failed flush and writes them once on the next flush", async () => {
    await expectRetriedExactlyOnce(await failingHarness("writeUsage", false));
  });

  it("does not count a batch twice when its write landed but the answer was lost", async () => {
    await expectRetriedExactlyOnce(await failingHarness("writeUsage", true));
  });

  it("sets last_used_at on a flush, and never moves it backwards", async () => {
    const c = h().admin;
    const key = await newKey(c, null);
    const lastUsed = async () => {
      const k = (await c.keys.getKey({ id: key.id })).key!;
      return k.lastUsedAt ? timestampMs(k.lastUsedAt) : null;
    };
    expect(await lastUsed()).toBeNull();

    const before = Date.now();
    expect(await verifyCode(c, key.plaintext)).toBe("VALID");
    const after = Date.now();
    expect(await lastUsed()).toBeNull(); // not before a flush
    await h().core.recorder.flush();
    const first = (await lastUsed())!;
    expect(first).toBeGreaterThanOrEqual(before);
    expect(first).toBeLessThanOrEqual(after);

    // A verification counted late with an older time (e.g. by a slower instance) does not lower it.
    await recordAt(h(), key.id, first - HOUR);
    await h().core.recorder.flush();
    expect(await lastUsed()).toBe(first);
    await h().store.touchLastUsed(new Map([[key.id, first - 1]]));
    expect(await lastUsed()).toBe(first);
    // A later one raises it.
    await h().store.touchLastUsed(new Map([[key.id, first + 5000]]));
    expect(await lastUsed()).toBe(first + 5000);
    await recordAt(h(), key.id, first + 1000);
    await h().core.recorder.flush();
    expect(await lastUsed()).toBe(first + 5000);
  });

  it("keeps last_used_at of a failed flush for the next one", async () => {
    const fresh = await failingHarness("touchLastUsed", false);
    try {
      const c = fresh.admin;
      const key = await newKey(c, null);
      const before = Date.now();
      expect(await verifyCode(c, key.plaintext)).toBe("VALID");
      await expect(fresh.core.recorder.flush()).rejects.toThrow(/injected/);
      expect((await c.keys.getKey({ id: key.id })).key!.lastUsedAt).toBeUndefined();
      await fresh.core.recorder.flush();
      const t = timestampMs((await c.keys.getKey({ id: key.id })).key!.lastUsedAt!);
      expect(t).toBeGreaterThanOrEqual(before);
      // The usage rows were written by the first flush, once.
      expect((await keyUsage(c, key.id)).totals.total).toBe(1);
    } finally {
      await fresh.close();
    }
  });

  let failing: ReturnType<typeof failingStore> | undefined;

  /** A second harness whose services see a store where `method` fails once (closed by the caller). */
  function failingHarness(method: "writeUsage" | "touchLastUsed", afterWriting: boolean): Promise<Harness> {
    return createHarness({
      store: kind,
      coreOptions: { usageFlushMs: HOUR },
      wrapStore: (s) => {
        failing = failingStore(s, method, { times: 1, afterWriting });
        return failing.store;
      },
    });
  }

  async function expectRetriedExactlyOnce(fresh: Harness): Promise<void> {
    try {
      const c = fresh.admin;
      const identityId = await newIdentity(c);
      const key = await newKey(c, identityId);
      for (let i = 0; i < 3; i++) expect(await verifyCode(c, key.plaintext)).toBe("VALID");
      await expect(fresh.core.recorder.flush()).rejects.toThrow(/injected writeUsage failure/);
      expect(failing!.failures()).toBe(1);
      // Counted meanwhile: written with the retried batch, in a batch of their own.
      for (let i = 0; i < 2; i++) expect(await verifyCode(c, key.plaintext, { tags: ["late"] })).toBe("VALID");
      await fresh.core.recorder.flush();
      expect(fresh.core.recorder.pendingEntries()).toBe(0);
      for (const g of ["MINUTE", "HOUR", "DAY"] as const) {
        expect((await identityUsage(c, { id: identityId }, { granularity: g, start: Date.now() - 2 * SIZE[g] })).totals, g).toEqual(counts({ total: 5, valid: 5 }));
      }
      expect((await keyUsage(c, key.id, { groupBy: "TAG" })).series.map((s) => [s.group, s.totals.total])).toEqual([["late", 2]]);
      await fresh.core.recorder.flush();
      expect((await keyUsage(c, key.id)).totals.total).toBe(5);
    } finally {
      await fresh.close();
    }
  }
});

describe("usage counting under load while the store is down", () => {
  it("survives a failing early flush (many pending entries) without an unhandled rejection, and writes everything once the store is back", async () => {
    let failing: ReturnType<typeof failingStore> | undefined;
    const h = await createHarness({
      store: "embedded",
      coreOptions: { usageFlushMs: HOUR },
      wrapStore: (s) => {
        failing = failingStore(s, "writeUsage", { times: Number.MAX_SAFE_INTEGER });
        return failing.store;
      },
    });
    const unhandled: unknown[] = [];
    const onUnhandled = (reason: unknown) => unhandled.push(reason);
    process.on("unhandledRejection", onUnhandled);
    try {
      const c = h.admin;
      const key = await newKey(c, null);
      // Ten fresh tags per verification: 2,000 verifications make 22,000 pending
      // entries, past the 20,000 that start a flush before the timer does.
      const n = 2000;
      for (let i = 0; i < n; i++) {
        const tags = Array.from({ length: 10 }, (_, j) => `t${i}-${j}`);
        expect(await verifyCode(c, key.plaintext, { tags })).toBe("VALID");
      }
      expect(failing!.calls()).toBeGreaterThan(0);
      // Let the failed early flush settle, then the event loop report any unhandled rejection.
      await h.core.recorder.flush().catch(() => undefined);
      await new Promise((r) => setImmediate(r));
      await new Promise((r) => setTimeout(r, 10));
      expect(unhandled.map(String)).toEqual([]);

      failing!.heal();
      await h.core.recorder.flush();
      expect((await keyUsage(c, key.id)).totals).toEqual(counts({ total: n, valid: n }));
      const tagged = await h.store.queryUsage({ by: { keyId: key.id }, granularity: "day", start: 0, end: Date.now() + DAY, tagged: true, maxRows: 100_000 });
      expect(tagged).toHaveLength(10 * n);
      expect(tagged.every((r) => r.counts.total === 1)).toBe(true);
    } finally {
      process.off("unhandledRejection", onUnhandled);
      failing?.heal();
      await h.close();
    }
  }, 120_000);
});

