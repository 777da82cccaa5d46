/**
 * UpdateCredits applies a refill that is due before its operation (one rule,
 * domain/credits.ts: refill, then spend or operate), so an INCREMENT on the
 * refill day is not wiped by the next verification's refill. With a clock the
 * test moves, on both stores.
 */
import { afterEach, beforeEach, expect, it } from "vitest";
import { createVerificationCache } from "../../src/cache/verification-cache.js";
import { Principal } from "../../src/domain/access.js";
import { createKeyManager } from "../../src/domain/keys.js";
import type { Credits } from "../../src/domain/types.js";
import { createVerifier, type VerifyInput } from "../../src/domain/verify.js";
import { createMemoryCounter } from "../../src/ratelimit/counter.js";
import { openTestStore, type StoreKind, type TestStore } from "../support/harness.js";
import { identityRecord, keyRecord } from "../support/records.js";
import { describeEachStore } from "./support.js";

const ADMIN = new Principal("root_test", [
  { action: "verify", apiId: null },
  { action: "write", apiId: null },
  { action: "read", apiId: null },
]);
const input = (key: string): VerifyInput => ({ key, apiId: "", permissions: "", ratelimits: [], cost: null, tags: [] });
const utc = (y: number, m: number, d: number, hh = 0) => Date.UTC(y, m - 1, d, hh);
/** 100 a month on the 1st, last refilled on March 1st. */
const monthly = (remaining: number): Credits => ({ remaining, refill: { interval: "monthly", amount: 100, refillDay: 1, lastRefillAt: utc(2027, 3, 1) } });

describeEachStore("UpdateCredits and a due refill", (kind: StoreKind) => {
  let ts: TestStore;
  const clock = { now: 0 };
  const now = () => clock.now;
  beforeEach(async () => {
    ts = await openTestStore(kind);
    clock.now = utc(2027, 3, 20);
  });
  afterEach(async () => {
    await ts.destroy();
  });

  function instance() {
    const cache = createVerificationCache({ store: ts.store, options: { maxEntries: 100, ttlMs: 3_600_000 }, now });
    return {
      verify: createVerifier({ store: ts.store, cache, counter: createMemoryCounter({ now }), now }),
      keys: createKeyManager({ store: ts.store, now }),
    };
  }

  it("adds an INCREMENT on the refill day to the refilled balance, and the next verification keeps it", async () => {
    const k = keyRecord({ credits: monthly(3) });
    await ts.store.createKey(k.record);
    const { verify, keys } = instance();
    expect((await verify(ADMIN, input(k.plaintext))).creditsRemaining).toBe(2); // cached with March's refill time

    clock.now = utc(2027, 4, 1, 9);
    const after = await keys.updateCredits(ADMIN, { keyId: k.record.id }, { op: "increment", value: 50 });
    expect(after).toEqual({ remaining: 150, refill: { ...monthly(0).refill!, lastRefillAt: utc(2027, 4, 1) } });
    const v = await verify(ADMIN, input(k.plaintext));
    expect([v.code, v.creditsRemaining]).toEqual(["VALID", 149]);
  });

  it("keeps a SET made on the refill day for the rest of the period", async () => {
    const identity = identityRecord({ credits: monthly(40) });
    await ts.store.createIdentity(identity);
    const k = keyRecord({ identityId: identity.id });
    await ts.store.createKey(k.record);
    const { verify, keys } = instance();
    expect((await verify(ADMIN, input(k.plaintext))).creditsRemaining).toBe(39);

    clock.now = utc(2027, 4, 1, 9);
    await keys.updateCredits(ADMIN, { identityId: identity.id }, { op: "set", value: 7 });
    expect((await verify(ADMIN, input(k.plaintext))).creditsRemaining).toBe(6);
    clock.now = utc(2027, 4, 30, 23);
    expect((await verify(ADMIN, input(k.plaintext))).creditsRemaining).toBe(5);
    clock.now = utc(2027, 5, 1);
    expect((await verify(ADMIN, input(k.plaintext))).creditsRemaining).toBe(99);
  });

  it("takes a DECREMENT on the refill day from the refilled balance", async () => {
    const k = keyRecord({ credits: monthly(3) });
    await ts.store.createKey(k.record);
    const { verify, keys } = instance();
    clock.now = utc(2027, 4, 2);
    expect(await keys.updateCredits(ADMIN, { keyId: k.record.id }, { op: "decrement", value: 30 })).toMatchObject({ remaining: 70 });
    expect((await verify(ADMIN, input(k.plaintext))).creditsRemaining).toBe(69);
  });
});
