/**
 * GetIdentityUsage and GetKeyUsage: the range rounded to whole buckets, one
 * point per bucket in time order (empty ones included), totals, and group_by
 * KEY / OUTCOME / TAG; an identity's usage is the sum over its keys and stays
 * put when a key is detached, moved or deleted; a deleted key's usage still
 * answers. Verifications at past times are counted through the recorder (as
 * the verifier reports them), so series span several buckets without waiting.
 */
import { expect, it } from "vitest";
import type { Clients, Harness } from "../support/harness.js";
import { codeOf, unique } from "../support/harness.js";
import { credits } from "../verify/support.js";
import {
  counts,
  DAY,
  describeEachStore,
  floorTo,
  HOUR,
  identityUsage,
  keyUsage,
  MINUTE,
  rawUsageFields,
  recordAt,
  sumCounts,
  useUsageHarness,
  type PlainReport,
} from "./support.js";

const API = "api_usage";

async function setup(h: Harness, nKeys: number): Promise<{ c: Clients; identityId: string; externalId: string; keys: { id: string; plaintext: string }[] }> {
  const c = h.admin;
  const externalId = unique("org");
  const { identity } = await c.identities.createIdentity({ externalId });
  const keys = [];
  for (let i = 0; i < nKeys; i++) {
    const res = await c.keys.createKey({ apiId: API, identity: { case: "identityId", value: identity!.id } });
    keys.push({ id: res.key!.id, plaintext: res.plaintext });
  }
  return { c, identityId: identity!.id, externalId, keys };
}

async function verifyValid(c: Clients, key: string, n = 1, tags: string[] = []): Promise<void> {
  for (let i = 0; i < n; i++) {
    const res = await c.keys.verifyKey({ key, tags });
    expect(res.valid).toBe(true);
  }
}

/** An explicit MINUTE range ending a minute from now: reports read at different moments cover the same buckets. */
function pinnedRange(): { start: number; end: number } {
  const now = Date.now();
  return { start: now - HOUR, end: now - (now % MINUTE) + 2 * MINUTE };
}

function totalsOf(r: PlainReport): Record<string, number> {
  return Object.fromEntries(r.series.map((s) => [s.group, s.totals.total]));
}

describeEachStore("usage queries", (kind) => {
  const h = useUsageHarness(kind);

  it("answers one point per bucket in time order, empty buckets included, with the range rounded out to whole buckets", async () => {
    const { c, identityId, keys } = await setup(h(), 1);
    const base = floorTo(Date.now(), HOUR) - 6 * HOUR;
    await recordAt(h(), keys[0].id, base + 10 * MINUTE, 2);
    await recordAt(h(), keys[0].id, base + 3 * HOUR + 59 * MINUTE, 3);
    await recordAt(h(), keys[0].id, base + 5 * HOUR, 1);
    await h().core.recorder.flush();

    const r = await identityUsage(c, { id: identityId }, { granularity: "HOUR", start: base + 17 * MINUTE, end: base + 5 * HOUR + 1 });
    expect(r.start).toBe(base);
    expect(r.end).toBe(base + 6 * HOUR);
    expect(r.series).toHaveLength(1);
    expect(r.series[0].group).toBe("");
    expect(r.series[0].points.map((p) => [p.time - base, p.counts.total])).toEqual([
      [0, 2],
      [HOUR, 0],
      [2 * HOUR, 0],
      [3 * HOUR, 3],
      [4 * HOUR, 0],
      [5 * HOUR, 1],
    ]);
    expect(r.totals).toEqual(counts({ total: 6, valid: 6 }));

    // The same verifications by minute and by day: same totals, other buckets.
    const byMinute = await identityUsage(c, { id: identityId }, { granularity: "MINUTE", start: base + 3 * HOUR + 50 * MINUTE, end: base + 4 * HOUR });
    expect(byMinute.series[0].points).toHaveLength(10);
    expect(byMinute.series[0].points.filter((p) => p.counts.total > 0).map((p) => [p.time - base, p.counts.total])).toEqual([[3 * HOUR + 59 * MINUTE, 3]]);
    const byDay = await identityUsage(c, { id: identityId }, { granularity: "DAY", start: base - 2 * DAY, end: base + 6 * HOUR });
    expect(byDay.series[0].points.map((p) => p.time)).toEqual(
      Array.from({ length: byDay.series[0].points.length }, (_, i) => floorTo(base - 2 * DAY, DAY) + i * DAY),
    );
    expect(byDay.totals.total).toBe(6);
  });

  it("leaves out verifications before start_time and from end_time on", async () => {
    const { c, keys } = await setup(h(), 1);
    const base = floorTo(Date.now(), HOUR) - 5 * HOUR;
    await recordAt(h(), keys[0].id, base - 1, 1);
    await recordAt(h(), keys[0].id, base, 2);
    await recordAt(h(), keys[0].id, base + 2 * HOUR - 1, 4);
    await recordAt(h(), keys[0].id, base + 2 * HOUR, 8);
    await h().core.recorder.flush();
    expect((await keyUsage(c, keys[0].id, { granularity: "HOUR", start: base, end: base + 2 * HOUR })).totals.total).toBe(6);
    expect((await keyUsage(c, keys[0].id, { granularity: "MINUTE", start: base, end: base + 2 * HOUR })).totals.total).toBe(6);
  });

  it("ends at the current bucket when end_time is not given", async () => {
    const { c, keys } = await setup(h(), 1);
    await verifyValid(c, keys[0].plaintext, 2);
    await h().core.recorder.flush();
    const before = Date.now();
    const r = await keyUsage(c, keys[0].id, { granularity: "HOUR", start: before - 3 * HOUR });
    const after = Date.now();
    // The end of the hour holding "now", as the server saw it between before and after.
    expect(r.end).toBeGreaterThanOrEqual(Math.ceil(before / HOUR) * HOUR);
    expect(r.end).toBeLessThanOrEqual(Math.ceil(after / HOUR) * HOUR);
    expect(r.series[0].points).toHaveLength((r.end - r.start) / HOUR);
    expect(r.totals.total).toBe(2);
  });

  it("finds the identity by external_id as by id", async () => {
    const { c, identityId, externalId, keys } = await setup(h(), 1);
    await verifyValid(c, keys[0].plaintext, 3);
    await h().core.recorder.flush();
    expect(await identityUsage(c, { externalId })).toEqual(await identityUsage(c, { id: identityId }));
    expect((await identityUsage(c, { externalId })).totals.total).toBe(3);
  });

  it("groups by key: one series per key, and the identity's totals are their sum", async () => {
    const { c, identityId, keys } = await setup(h(), 3);
    const base = floorTo(Date.now(), HOUR) - 3 * HOUR;
    await recordAt(h(), keys[0].id, base, 1);
    await recordAt(h(), keys[1].id, base + HOUR, 2);
    await recordAt(h(), keys[2].id, base + 2 * HOUR, 4);
    await recordAt(h(), keys[2].id, base, 8);
    await h().core.recorder.flush();
    const r = await identityUsage(c, { id: identityId }, { granularity: "HOUR", start: base, end: base + 3 * HOUR, groupBy: "KEY" });
    expect(r.series.map((s) => s.group)).toEqual(keys.map((k) => k.id).sort());
    expect(totalsOf(r)).toEqual({ [keys[0].id]: 1, [keys[1].id]: 2, [keys[2].id]: 12 });
    const k2 = r.series.find((s) => s.group === keys[2].id)!;
    expect(k2.points.map((p) => p.counts.total)).toEqual([8, 0, 4]);
    expect(r.totals).toEqual(sumCounts(r.series.map((s) => s.totals)));
    for (const k of keys) {
      expect((await keyUsage(c, k.id, { granularity: "HOUR", start: base, end: base + 3 * HOUR })).totals).toEqual(r.series.find((s) => s.group === k.id)!.totals);
    }
    // KEY on a key's own usage is one series, as without grouping.
    const own = await keyUsage(c, keys[2].id, { granularity: "HOUR", start: base, end: base + 3 * HOUR, groupBy: "KEY" });
    expect(own.series).toHaveLength(1);
    expect(own.series[0].totals.total).toBe(12);
  });

  it("groups by outcome: one series per outcome, each counting its own, credits in VALID only", async () => {
    const { c, identityId, keys } = await setup(h(), 1);
    const scarce = (await c.keys.createKey({ apiId: API, credits: credits(2), identity: { case: "identityId", value: identityId } }));
    const v = async (key: string, req: Record<string, unknown> = {}) => (await c.keys.verifyKey({ key, ...req })).code;
    await v(scarce.plaintext, { cost: 2n });
    await v(scarce.plaintext);
    await v(keys[0].plaintext);
    await v(keys[0].plaintext, { apiId: "api_elsewhere" });
    await c.keys.updateKey({ key: { id: keys[0].id, enabled: false }, updateMask: { paths: ["enabled"] } });
    await v(keys[0].plaintext);
    await v(keys[0].plaintext);
    await h().core.recorder.flush();

    const r = await identityUsage(c, { id: identityId }, { groupBy: "OUTCOME" });
    expect(r.series.map((s) => s.group)).toEqual(["VALID", "NOT_FOUND", "DISABLED", "EXPIRED", "INSUFFICIENT_PERMISSIONS", "RATE_LIMITED", "USAGE_EXCEEDED"]);
    const by = Object.fromEntries(r.series.map((s) => [s.group, s.totals]));
    expect(by.VALID).toEqual(counts({ total: 2, valid: 2, creditsSpent: 2 }));
    expect(by.NOT_FOUND).toEqual(counts({ total: 1, notFound: 1 }));
    expect(by.DISABLED).toEqual(counts({ total: 2, disabled: 2 }));
    expect(by.USAGE_EXCEEDED).toEqual(counts({ total: 1, usageExceeded: 1 }));
    for (const empty of ["EXPIRED", "INSUFFICIENT_PERMISSIONS", "RATE_LIMITED"]) expect(by[empty]).toEqual(counts({}));
    expect(r.totals).toEqual(sumCounts(r.series.map((s) => s.totals)));
    for (const s of r.series) {
      expect(s.points).toHaveLength(r.series[0].points.length);
      expect(sumCounts(s.points.map((p) => p.counts))).toEqual(s.totals);
    }
    const own = await keyUsage(c, keys[0].id, { groupBy: "OUTCOME" });
    expect(totalsOf(own)).toMatchObject({ VALID: 1, NOT_FOUND: 1, DISABLED: 2, USAGE_EXCEEDED: 0 });
  });

  it("groups by tag: one series per tag; untagged verifications in none of them", async () => {
    const { c, identityId, keys } = await setup(h(), 2);
    await verifyValid(c, keys[0].plaintext, 2, ["plan:pro", "region:eu"]);
    await verifyValid(c, keys[1].plaintext, 1, ["region:eu"]);
    await verifyValid(c, keys[1].plaintext, 4);
    await h().core.recorder.flush();
    const r = await identityUsage(c, { id: identityId }, { groupBy: "TAG" });
    expect(r.series.map((s) => s.group)).toEqual(["plan:pro", "region:eu"]);
    expect(totalsOf(r)).toEqual({ "plan:pro": 2, "region:eu": 3 });
    expect(r.totals.total).toBe(7);
    expect(totalsOf(await keyUsage(c, keys[1].id, { groupBy: "TAG" }))).toEqual({ "region:eu": 1 });
  });

  it("answers zero counts and empty buckets for an identity without usage", async () => {
    const { c, identityId } = await setup(h(), 1);
    const r = await identityUsage(c, { id: identityId }, { granularity: "MINUTE", start: Date.now() - 10 * MINUTE });
    expect(r.totals).toEqual(counts({}));
    expect(r.series).toHaveLength(1);
    expect(r.series[0].points.length).toBeGreaterThanOrEqual(10);
    expect(r.series[0].points.every((p) => p.counts.total === 0)).toBe(true);
    expect((await identityUsage(c, { id: identityId }, { groupBy: "KEY" })).series).toEqual([]);
    expect((await identityUsage(c, { id: identityId }, { groupBy: "TAG" })).series).toEqual([]);
  });

  it("keeps an identity's usage when a key is detached; later verifications of that key count for the key only", async () => {
    const { c, identityId, keys } = await setup(h(), 2);
    await verifyValid(c, keys[0].plaintext, 3, ["t"]);
    await verifyValid(c, keys[1].plaintext, 2);
    await h().core.recorder.flush();
    // One range for every report compared below, so they cannot straddle a minute boundary.
    const range = pinnedRange();
    const before = await identityUsage(c, { id: identityId }, { groupBy: "KEY", ...range });
    expect(before.totals.total).toBe(5);

    const detached = await c.keys.updateKey({ key: { id: keys[0].id, identityId: "" }, updateMask: { paths: ["identity_id"] } });
    expect(detached.key!.identityId).toBe("");
    expect(await identityUsage(c, { id: identityId }, { groupBy: "KEY", ...range })).toEqual(before);

    await verifyValid(c, keys[0].plaintext, 4);
    await h().core.recorder.flush();
    expect(await identityUsage(c, { id: identityId }, { groupBy: "KEY", ...range })).toEqual(before);
    expect((await keyUsage(c, keys[0].id)).totals.total).toBe(7);
  });

  it("keeps usage with the identity it was counted for when a key moves to another identity", async () => {
    const a = await setup(h(), 1);
    const b = await setup(h(), 0);
    const key = a.keys[0];
    await verifyValid(a.c, key.plaintext, 2);
    await h().core.recorder.flush();
    await a.c.keys.updateKey({ key: { id: key.id, externalId: b.externalId }, updateMask: { paths: ["external_id"] } });
    await verifyValid(a.c, key.plaintext, 5);
    await h().core.recorder.flush();
    expect((await identityUsage(a.c, { id: a.identityId })).totals.total).toBe(2);
    expect((await identityUsage(a.c, { id: b.identityId })).totals.total).toBe(5);
    expect(totalsOf(await identityUsage(a.c, { id: b.identityId }, { groupBy: "KEY" }))).toEqual({ [key.id]: 5 });
    expect((await keyUsage(a.c, key.id)).totals.total).toBe(7);
  });

  it("keeps an identity's usage when a key is deleted, and still answers the deleted key's usage", async () => {
    const { c, identityId, keys } = await setup(h(), 2);
    await verifyValid(c, keys[0].plaintext, 3);
    await verifyValid(c, keys[1].plaintext, 1);
    await h().core.recorder.flush();
    const range = pinnedRange();
    const before = await identityUsage(c, { id: identityId }, { groupBy: "KEY", ...range });
    const keyBefore = await keyUsage(c, keys[0].id, range);

    await c.keys.deleteKey({ id: keys[0].id });
    expect((await c.keys.verifyKey({ key: keys[0].plaintext })).valid).toBe(false);
    await h().core.recorder.flush();
    expect(await identityUsage(c, { id: identityId }, { groupBy: "KEY", ...range })).toEqual(before);
    expect(before.totals.total).toBe(4);
    expect(await keyUsage(c, keys[0].id, range)).toEqual(keyBefore);
    expect(keyBefore.totals).toEqual(counts({ total: 3, valid: 3 }));
  });

  it("counts a rerolled key under the new key id and the old key (in its grace period) under its own, both for the identity", async () => {
    const { c, identityId, keys } = await setup(h(), 1);
    await verifyValid(c, keys[0].plaintext, 2);
    const rolled = await c.keys.rerollKey({ id: keys[0].id, gracePeriod: { seconds: 3600n, nanos: 0 } });
    await verifyValid(c, rolled.plaintext, 3);
    await verifyValid(c, keys[0].plaintext, 1);
    await h().core.recorder.flush();
    expect(totalsOf(await identityUsage(c, { id: identityId }, { groupBy: "KEY" }))).toEqual({ [keys[0].id]: 3, [rolled.key!.id]: 3 });
    expect((await keyUsage(c, rolled.key!.id)).totals.total).toBe(3);
  });

  it("keeps the usage of a deleted identity readable by id, including its keys deleted with it", async () => {
    const { c, identityId, externalId, keys } = await setup(h(), 2);
    await verifyValid(c, keys[0].plaintext, 2);
    await verifyValid(c, keys[1].plaintext, 1);
    await h().core.recorder.flush();
    await c.identities.deleteIdentity({ lookup: { case: "id", value: identityId }, deleteKeys: true });
    expect((await identityUsage(c, { id: identityId })).totals.total).toBe(3);
    expect((await keyUsage(c, keys[0].id)).totals.total).toBe(2);
    // The external id no longer names anything.
    expect(await codeOf(c.identities.getIdentityUsage({ lookup: { case: "externalId", value: externalId }, ...rawUsageFields({ granularity: "HOUR", start: Date.now() - HOUR }) }))).toBe("NotFound");
  });
});
