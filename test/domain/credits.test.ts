/**
 * Credit refill periods (src/domain/credits.ts) and the store's credit
 * spending (Store.spendCredits): all or nothing, the refill applied once per
 * period however many spends race, never below zero. The store part runs on
 * both stores (MongoDB via MONGODB_URI; required in CI).
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { dueRefill, refillPeriodStart } from "../../src/domain/credits.js";
import { newId } from "../../src/domain/ids.js";
import type { Credits, CreditsTarget, Refill } from "../../src/domain/types.js";
import { openTestStore, type TestStore } from "../support/harness.js";
import { identityRecord, keyRecord } from "../support/records.js";
import { describeEachStore } from "../verify/support.js";

const utc = (y: number, m: number, d: number, hh = 0, mm = 0, ss = 0, ms = 0) => Date.UTC(y, m - 1, d, hh, mm, ss, ms);
const iso = (t: number) => new Date(t).toISOString();

const daily: Refill = { interval: "daily", amount: 10, refillDay: null, lastRefillAt: 0 };
const monthly = (refillDay: number | null): Refill => ({ interval: "monthly", amount: 10, refillDay, lastRefillAt: 0 });

describe("refillPeriodStart", () => {
  it("starts a daily period at 00:00 UTC of the day", () => {
    expect(iso(refillPeriodStart(daily, utc(2027, 3, 14, 15, 9, 26)))).toBe("2027-03-14T00:00:00.000Z");
    expect(iso(refillPeriodStart(daily, utc(2027, 3, 14)))).toBe("2027-03-14T00:00:00.000Z");
    expect(iso(refillPeriodStart(daily, utc(2027, 3, 14) - 1))).toBe("2027-03-13T00:00:00.000Z");
    expect(iso(refillPeriodStart(daily, utc(2027, 1, 1, 0, 0, 0, 1)))).toBe("2027-01-01T00:00:00.000Z");
  });

  it("starts a monthly period at 00:00 UTC of refill_day, else of the previous month's refill_day", () => {
    expect(iso(refillPeriodStart(monthly(15), utc(2027, 3, 20)))).toBe("2027-03-15T00:00:00.000Z");
    expect(iso(refillPeriodStart(monthly(15), utc(2027, 3, 15)))).toBe("2027-03-15T00:00:00.000Z");
    expect(iso(refillPeriodStart(monthly(15), utc(2027, 3, 15) - 1))).toBe("2027-02-15T00:00:00.000Z");
    expect(iso(refillPeriodStart(monthly(15), utc(2027, 1, 10)))).toBe("2026-12-15T00:00:00.000Z");
  });

  it("uses day 1 for a monthly refill without refill_day", () => {
    expect(iso(refillPeriodStart(monthly(null), utc(2027, 7, 19)))).toBe("2027-07-01T00:00:00.000Z");
    expect(iso(refillPeriodStart(monthly(1), utc(2027, 1, 1) - 1))).toBe("2026-12-01T00:00:00.000Z");
  });

  it("refills on the last day of February for refill_day 31 (and 29, 30), in common and leap years", () => {
    expect(iso(refillPeriodStart(monthly(31), utc(2027, 2, 28)))).toBe("2027-02-28T00:00:00.000Z");
    expect(iso(refillPeriodStart(monthly(31), utc(2027, 2, 27, 23, 59, 59, 999)))).toBe("2027-01-31T00:00:00.000Z");
    expect(iso(refillPeriodStart(monthly(31), utc(2027, 3, 15)))).toBe("2027-02-28T00:00:00.000Z");
    expect(iso(refillPeriodStart(monthly(29), utc(2027, 2, 28, 12)))).toBe("2027-02-28T00:00:00.000Z");
    expect(iso(refillPeriodStart(monthly(30), utc(2027, 2, 28, 12)))).toBe("2027-02-28T00:00:00.000Z");
    expect(iso(refillPeriodStart(monthly(31), utc(2028, 2, 28, 12)))).toBe("2028-01-31T00:00:00.000Z");
    expect(iso(refillPeriodStart(monthly(31), utc(2028, 2, 29)))).toBe("2028-02-29T00:00:00.000Z");
  });

  it("refills on April 30 for refill_day 31, and on the 31st again in May", () => {
    expect(iso(refillPeriodStart(monthly(31), utc(2027, 4, 29, 23)))).toBe("2027-03-31T00:00:00.000Z");
    expect(iso(refillPeriodStart(monthly(31), utc(2027, 4, 30)))).toBe("2027-04-30T00:00:00.000Z");
    expect(iso(refillPeriodStart(monthly(31), utc(2027, 5, 30, 23)))).toBe("2027-04-30T00:00:00.000Z");
    expect(iso(refillPeriodStart(monthly(31), utc(2027, 5, 31)))).toBe("2027-05-31T00:00:00.000Z");
  });

  it("crosses the year boundary for refill_day 31 in January", () => {
    expect(iso(refillPeriodStart(monthly(31), utc(2027, 1, 30)))).toBe("2026-12-31T00:00:00.000Z");
  });
});

describe("dueRefill", () => {
  it("is the new period's start when the balance was last refilled before it", () => {
    const r: Refill = { ...daily, lastRefillAt: utc(2027, 5, 1) };
    expect(dueRefill(r, utc(2027, 5, 2, 0, 0, 0, 1))).toBe(utc(2027, 5, 2));
  });

  it("is null within the period already refilled, and without a refill rule", () => {
    const r: Refill = { ...daily, lastRefillAt: utc(2027, 5, 2) };
    expect(dueRefill(r, utc(2027, 5, 2, 23, 59))).toBeNull();
    expect(dueRefill(null, utc(2027, 5, 2))).toBeNull();
  });

  it("is not due again for a balance created mid-period (lastRefillAt = creation time)", () => {
    const r: Refill = { ...monthly(1), lastRefillAt: utc(2027, 5, 17, 13) };
    expect(dueRefill(r, utc(2027, 5, 31))).toBeNull();
    expect(dueRefill(r, utc(2027, 6, 1))).toBe(utc(2027, 6, 1));
  });
});

describeEachStore("Store.spendCredits", (kind) => {
  let ts: TestStore;
  beforeAll(async () => {
    ts = await openTestStore(kind);
  });
  afterAll(async () => {
    await ts?.destroy();
  });

  /** A new key (or identity) holding `credits`; returns the spend target. */
  async function target(credits: Credits | null, on: "key" | "identity" = "key"): Promise<CreditsTarget> {
    if (on === "identity") {
      const rec = identityRecord({ credits });
      await ts.store.createIdentity(rec);
      return { identityId: rec.id };
    }
    const { record } = keyRecord({ apiId: "api_credits", credits });
    await ts.store.createKey(record);
    const id = record.id;
    return { keyId: id };
  }

  async function balance(t: CreditsTarget): Promise<Credits | null> {
    const rec = "keyId" in t ? await ts.store.getKey(t.keyId) : await ts.store.getIdentity(t.identityId);
    return rec!.credits;
  }

  const P0 = utc(2027, 2, 1);
  const P1 = utc(2027, 3, 1);
  const withRefill = (remaining: number, amount: number, lastRefillAt = P0): Credits => ({
    remaining,
    refill: { interval: "monthly", amount, refillDay: 1, lastRefillAt },
  });

  for (const on of ["key", "identity"] as const) {
    it(`spends all or nothing from a ${on}'s balance`, async () => {
      const t = await target({ remaining: 5, refill: null }, on);
      expect(await ts.store.spendCredits(t, 3, null)).toMatchObject({ ok: true, remaining: 2 });
      expect(await ts.store.spendCredits(t, 3, null)).toMatchObject({ ok: false, remaining: 2 });
      expect(await ts.store.spendCredits(t, 0, null)).toMatchObject({ ok: true, remaining: 2 });
      expect(await ts.store.spendCredits(t, 2, null)).toMatchObject({ ok: true, remaining: 0 });
      expect(await ts.store.spendCredits(t, 1, null)).toMatchObject({ ok: false, remaining: 0 });
      expect((await balance(t))!.remaining).toBe(0);
    });
  }

  it("answers remaining null, spending nothing, for an unlimited balance and for a vanished target", async () => {
    expect(await ts.store.spendCredits(await target(null), 7, null)).toEqual({ ok: true, remaining: null });
    expect(await ts.store.spendCredits({ keyId: newId("key") }, 7, null)).toEqual({ ok: true, remaining: null });
  });

  it("applies a due refill by setting the balance to the amount, then spends, and records the period", async () => {
    const t = await target(withRefill(3, 10));
    expect(await ts.store.spendCredits(t, 1, { periodStart: P1, amount: 10 })).toMatchObject({ ok: true, remaining: 9 });
    const after = await balance(t);
    expect(after!.remaining).toBe(9);
    expect(after!.refill!.lastRefillAt).toBe(P1);
  });

  it("does not refill twice for the same period", async () => {
    const t = await target(withRefill(0, 10));
    expect(await ts.store.spendCredits(t, 4, { periodStart: P1, amount: 10 })).toMatchObject({ ok: true, remaining: 6 });
    expect(await ts.store.spendCredits(t, 4, { periodStart: P1, amount: 10 })).toMatchObject({ ok: true, remaining: 2 });
    expect(await ts.store.spendCredits(t, 4, { periodStart: P1, amount: 10 })).toMatchObject({ ok: false, remaining: 2 });
  });

  it("ignores a refill for a period not after the last one", async () => {
    const t = await target(withRefill(1, 10, P1));
    expect(await ts.store.spendCredits(t, 1, { periodStart: P0, amount: 10 })).toMatchObject({ ok: true, remaining: 0 });
    expect(await ts.store.spendCredits(t, 1, { periodStart: P1, amount: 10 })).toMatchObject({ ok: false, remaining: 0 });
  });

  it("refills a refused spend's balance too (the refill is not all-or-nothing with the spend)", async () => {
    const t = await target(withRefill(0, 2));
    expect(await ts.store.spendCredits(t, 5, { periodStart: P1, amount: 2 })).toMatchObject({ ok: false, remaining: 2 });
    expect((await balance(t))!.refill!.lastRefillAt).toBe(P1);
  });

  it("refills once when two spends race at a period boundary", async () => {
    const t = await target(withRefill(0, 10));
    const due = { periodStart: P1, amount: 10 };
    const res = await Promise.all([ts.store.spendCredits(t, 1, due), ts.store.spendCredits(t, 1, due)]);
    expect(res.every((r) => r.ok)).toBe(true);
    expect(res.map((r) => r.remaining).sort()).toEqual([8, 9]);
    expect((await balance(t))!.remaining).toBe(8);
  });

  it("refills once when 25 spends race at a period boundary: exactly the amount is spent", async () => {
    const t = await target(withRefill(0, 10), "identity");
    const due = { periodStart: P1, amount: 10 };
    const res = await Promise.all(Array.from({ length: 25 }, () => ts.store.spendCredits(t, 1, due)));
    expect(res.filter((r) => r.ok)).toHaveLength(10);
    expect((await balance(t))!.remaining).toBe(0);
  });

  it("never goes below zero: 100 concurrent spends of 1 against 10 credits admit exactly 10", async () => {
    const t = await target({ remaining: 10, refill: null });
    const res = await Promise.all(Array.from({ length: 100 }, () => ts.store.spendCredits(t, 1, null)));
    expect(res.filter((r) => r.ok)).toHaveLength(10);
    expect(res.every((r) => r.remaining !== null && r.remaining >= 0)).toBe(true);
    expect((await balance(t))!.remaining).toBe(0);
  });
});
