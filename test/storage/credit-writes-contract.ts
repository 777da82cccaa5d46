/**
 * The credit-writes contract: Store.spendCredits and Store.updateCredits as
 * every way of writing credits must behave (test/storage/credit-writes.test.ts,
 * test/storage/redis-credits.test.ts).
 */
import { afterEach, beforeEach, expect, it } from "vitest";
import { FailedPreconditionError } from "../../src/domain/errors.js";
import { newId } from "../../src/domain/ids.js";
import type { Credits, CreditsTarget, KeyRecord } from "../../src/domain/types.js";
import type { Store } from "../../src/storage/store.js";
import { callState } from "../support/call-state.js";
import { identityRecord, keyRecord } from "../support/records.js";

const DAY = 86_400_000;
const today = Math.floor(Date.now() / DAY) * DAY;
const daily = (remaining: number, lastRefillAt: number): Credits => ({
  remaining,
  refill: { interval: "daily", amount: 10, refillDay: null, lastRefillAt },
});

export function creditWritesContract(open: () => Promise<{ store: Store; close: () => Promise<void> }>, opts: { concurrent: boolean }) {
  let store: Store;
  let close: () => Promise<void>;
  beforeEach(async () => {
    ({ store, close } = await open());
  });
  afterEach(async () => {
    await close();
  });

  async function key(credits: Credits | null, over: Partial<KeyRecord> = {}): Promise<KeyRecord> {
    const { record } = keyRecord({ credits, ...over });
    await store.createKey(record);
    return record;
  }
  const left = async (id: string) => (await store.getKey(id))!.credits;

  it("spends all or nothing, never below zero; cost 0 spends nothing", async () => {
    const k = await key({ remaining: 5, refill: null });
    expect(await store.spendCredits({ keyId: k.id }, 3, null)).toMatchObject({ ok: true, remaining: 2 });
    expect(await store.spendCredits({ keyId: k.id }, 3, null)).toMatchObject({ ok: false, remaining: 2 });
    expect(await store.spendCredits({ keyId: k.id }, 0, null)).toMatchObject({ ok: true, remaining: 2 });
    expect(await store.spendCredits({ keyId: k.id }, 2, null)).toMatchObject({ ok: true, remaining: 0 });
    expect(await store.spendCredits({ keyId: k.id }, 1, null)).toMatchObject({ ok: false, remaining: 0 });
    expect(await left(k.id)).toEqual({ remaining: 0, refill: null });
  });

  it("writes nothing once the spend's call has ended, told by an AbortSignal or by the lean path's call state", async () => {
    const k = await key({ remaining: 5, refill: null });
    const ended = new Error("the call's deadline passed");
    const controller = new AbortController();
    controller.abort(ended);
    await expect(store.spendCredits({ keyId: k.id }, 1, null, controller.signal)).rejects.toBe(ended);
    const call = callState();
    call.end(ended);
    await expect(store.spendCredits({ keyId: k.id }, 1, null, call.signal)).rejects.toBe(ended);
    expect(await left(k.id)).toEqual({ remaining: 5, refill: null });
    // A call still open spends as usual.
    const open = callState();
    expect(await store.spendCredits({ keyId: k.id }, 1, null, open.signal)).toMatchObject({ ok: true, remaining: 4 });
  });

  it("spends nothing from an unlimited balance or a target that does not exist", async () => {
    const k = await key(null);
    expect(await store.spendCredits({ keyId: k.id }, 1, null)).toEqual({ ok: true, remaining: null });
    expect(await store.spendCredits({ keyId: newId("key") }, 1, null)).toEqual({ ok: true, remaining: null });
    expect(await store.spendCredits({ identityId: newId("id") }, 1, null)).toEqual({ ok: true, remaining: null });
  });

  it("applies a due refill once, then spends; a stale refill from a cache does not refill again", async () => {
    const k = await key(daily(2, today - DAY));
    const due = { periodStart: today, amount: 10 };
    expect(await store.spendCredits({ keyId: k.id }, 4, due)).toMatchObject({ ok: true, remaining: 6 });
    expect(await store.spendCredits({ keyId: k.id }, 4, due)).toMatchObject({ ok: true, remaining: 2 });
    expect(await store.spendCredits({ keyId: k.id }, 4, due)).toMatchObject({ ok: false, remaining: 2 });
    expect(await left(k.id)).toEqual(daily(2, today));
  });

  it("ignores a refill for a balance that has no refill rule (any more)", async () => {
    const k = await key({ remaining: 3, refill: null });
    expect(await store.spendCredits({ keyId: k.id }, 1, { periodStart: today, amount: 100 })).toMatchObject({ ok: true, remaining: 2 });
  });

  it("spends an identity's balance the same way", async () => {
    const i = identityRecord({ credits: daily(0, today - DAY) });
    await store.createIdentity(i);
    const target: CreditsTarget = { identityId: i.id };
    expect(await store.spendCredits(target, 1, { periodStart: today, amount: 10 })).toMatchObject({ ok: true, remaining: 9 });
    expect((await store.getIdentity(i.id))!.credits).toEqual(daily(9, today));
  });

  it("writes nothing for a spend whose signal has aborted", async () => {
    const k = await key({ remaining: 5, refill: null });
    await expect(store.spendCredits({ keyId: k.id }, 1, null, AbortSignal.abort(new Error("gone")))).rejects.toThrow("gone");
    expect(await left(k.id)).toEqual({ remaining: 5, refill: null });
  });

  it("spends through a key whose balance moved by a reroll, from the key it moved to", async () => {
    const old = await key({ remaining: 5, refill: null });
    const { record: next } = keyRecord({ apiId: old.apiId, credits: old.credits });
    const stored = await store.rerollKey(old.id, next, Date.now() + 60_000, Date.now());
    expect(stored!.credits).toEqual({ remaining: 5, refill: null });
    expect(await store.spendCredits({ keyId: old.id }, 2, null)).toMatchObject({ ok: true, remaining: 3 });
    expect(await store.spendCredits({ keyId: next.id }, 2, null)).toMatchObject({ ok: true, remaining: 1 });
    expect(await left(old.id)).toEqual({ remaining: 1, refill: null });
    expect((await store.getKey(old.id))!.creditsKeyId).toBe(next.id);
    // Once the key it moved to is deleted, nothing is left to spend.
    await store.deleteKey(next.id);
    expect(await store.spendCredits({ keyId: old.id }, 1, null)).toMatchObject({ ok: false, remaining: 0 });
    expect(await thrown(store.updateCredits({ keyId: old.id }, { op: "increment", value: 1 }, Date.now(), null))).toBeInstanceOf(FailedPreconditionError);
  });

  it("gives a spend back only while the balance is in the refill period it was made in, through moves", async () => {
    const k = await key(daily(5, today));
    const spent = await store.spendCredits({ keyId: k.id }, 2, null);
    expect(spent).toEqual({ ok: true, remaining: 3, refilledAt: today });
    expect(await store.returnCredits({ keyId: k.id }, 2, today)).toBe(true);
    expect(await left(k.id)).toEqual(daily(5, today));
    // After a refill, a spend of the period before is not given back.
    await store.spendCredits({ keyId: k.id }, 1, { periodStart: today + DAY, amount: 10 });
    expect(await store.returnCredits({ keyId: k.id }, 2, today)).toBe(false);
    expect(await left(k.id)).toEqual(daily(9, today + DAY));
    // A balance without a refill rule; a balance that moved by a reroll.
    const plain = await key({ remaining: 1, refill: null });
    expect(await store.spendCredits({ keyId: plain.id }, 1, null)).toEqual({ ok: true, remaining: 0, refilledAt: null });
    const { record: next } = keyRecord({ apiId: plain.apiId, credits: plain.credits });
    await store.rerollKey(plain.id, next, Date.now() + 60_000, Date.now());
    expect(await store.returnCredits({ keyId: plain.id }, 1, null)).toBe(true);
    expect(await left(next.id)).toEqual({ remaining: 1, refill: null });
    expect(await store.returnCredits({ keyId: newId("key") }, 1, null)).toBe(false);
  });

  it("applies a due refill before an update: an increment on the refill day adds to the refilled balance", async () => {
    const k = await key(daily(1, today - DAY));
    expect(await store.updateCredits({ keyId: k.id }, { op: "increment", value: 5 }, Date.now(), { periodStart: today, amount: 10 })).toEqual(daily(15, today));
    expect(await store.spendCredits({ keyId: k.id }, 1, { periodStart: today, amount: 10 })).toMatchObject({ ok: true, remaining: 14 });
  });

  it("updates a balance: a set keeps the refill rule, a decrement stops at zero, no arithmetic on an unlimited one", async () => {
    const refill = { interval: "monthly" as const, amount: 1000, refillDay: 15, lastRefillAt: 123 };
    const k = await key({ remaining: 10, refill });
    const up = (op: Parameters<Store["updateCredits"]>[1], target: CreditsTarget = { keyId: k.id }) => store.updateCredits(target, op, Date.now(), null);
    expect(await up({ op: "set", value: 77 })).toEqual({ remaining: 77, refill });
    expect(await up({ op: "decrement", value: 100 })).toEqual({ remaining: 0, refill });
    expect(await up({ op: "increment", value: 4 })).toEqual({ remaining: 4, refill });
    expect(await up({ op: "increment", value: Number.MAX_SAFE_INTEGER })).toEqual({ remaining: Number.MAX_SAFE_INTEGER, refill });
    expect(await left(k.id)).toEqual({ remaining: Number.MAX_SAFE_INTEGER, refill });
    expect(await up({ op: "set", value: null })).toBeNull();
    expect(await left(k.id)).toBeNull();
    expect(await thrown(up({ op: "increment", value: 1 }))).toBeInstanceOf(FailedPreconditionError);
    expect(await thrown(up({ op: "decrement", value: 1 }))).toBeInstanceOf(FailedPreconditionError);
    expect(await up({ op: "set", value: 3 })).toEqual({ remaining: 3, refill: null });
    const i = identityRecord({ credits: { remaining: 2, refill: null } });
    await store.createIdentity(i);
    expect(await up({ op: "decrement", value: 1 }, { identityId: i.id })).toEqual({ remaining: 1, refill: null });
    expect((await store.getIdentity(i.id))!.credits).toEqual({ remaining: 1, refill: null });
    expect(await up({ op: "set", value: 1 }, { keyId: newId("key") })).toBeUndefined();
    expect(await up({ op: "decrement", value: 1 }, { identityId: newId("id") })).toBeUndefined();
  });

  if (!opts.concurrent) return;

  it("admits exactly the balance from 40 concurrent spends, with a refill due to all of them", async () => {
    const k = await key(daily(0, today - DAY));
    const due = { periodStart: today, amount: 10 };
    const res = await Promise.all(Array.from({ length: 40 }, () => store.spendCredits({ keyId: k.id }, 1, due)));
    expect(res.filter((r) => r.ok)).toHaveLength(10);
    expect(await left(k.id)).toEqual(daily(0, today));
  });

  it("applies 30 concurrent increments and spends exactly", async () => {
    const k = await key({ remaining: 100, refill: null });
    await Promise.all(
      Array.from({ length: 30 }, (_, i) =>
        i % 2 ? store.spendCredits({ keyId: k.id }, 2, null) : store.updateCredits({ keyId: k.id }, { op: "increment", value: 1 }, Date.now(), null),
      ),
    );
    expect(await left(k.id)).toEqual({ remaining: 100 + 15 - 30, refill: null });
  });
}

async function thrown(p: Promise<unknown>): Promise<unknown> {
  try {
    await p;
  } catch (err) {
    return err;
  }
  throw new Error("expected a rejection");
}

