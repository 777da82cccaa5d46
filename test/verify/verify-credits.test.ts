/**
 * VerifyKey credits: per key and per identity (shared by its keys; the key's own
 * balance first), the request's cost, refills once per period (with an injected
 * clock at the domain level), and never spending below zero under concurrency.
 * On both stores.
 */
import { afterEach, beforeEach, expect, it } from "vitest";
import { CreditsOperation } from "../../gen/latchkey/v1/key_service_pb.js";
import { createVerificationCache } from "../../src/cache/verification-cache.js";
import { Principal } from "../../src/domain/access.js";
import { hashKey } from "../../src/domain/key-format.js";
import type { Credits, IdentityRecord, KeyRecord } from "../../src/domain/types.js";
import { createVerifier, type VerifyInput } from "../../src/domain/verify.js";
import { createMemoryCounter } from "../../src/ratelimit/counter.js";
import type { Store } from "../../src/storage/store.js";
import { openTestStore, unique, useHarness, type StoreKind, type TestStore } from "../support/harness.js";
import { identityRecord, keyRecord } from "../support/records.js";
import { count, createIdentityWithKeys, createKey, credits, describeEachStore, verify, verifyConcurrently } from "./support.js";

describeEachStore("VerifyKey credits", (kind) => {
  const h = useHarness({ store: kind });

  it("spends one credit per verification from the key's balance, then answers USAGE_EXCEEDED", async () => {
    const { plaintext, id } = await createKey(h().admin, { credits: credits(3) });
    const left: [string, bigint | undefined][] = [];
    for (let i = 0; i < 5; i++) {
      const r = await verify(h().admin, plaintext);
      left.push([r.codeName, r.creditsRemaining]);
    }
    expect(left).toEqual([
      ["VALID", 2n],
      ["VALID", 1n],
      ["VALID", 0n],
      ["USAGE_EXCEEDED", 0n],
      ["USAGE_EXCEEDED", 0n],
    ]);
    expect((await h().admin.keys.getKey({ id })).key!.credits!.remaining).toBe(0n);
  });

  it("spends the request's cost; cost 0 is allowed and spends nothing; a cost above the balance spends nothing", async () => {
    const { plaintext, id } = await createKey(h().admin, { credits: credits(10) });
    const spend = async (cost: bigint) => {
      const r = await verify(h().admin, plaintext, { cost });
      return [r.codeName, r.creditsRemaining];
    };
    expect(await spend(4n)).toEqual(["VALID", 6n]);
    expect(await spend(0n)).toEqual(["VALID", 6n]);
    expect(await spend(7n)).toEqual(["USAGE_EXCEEDED", 6n]);
    expect(await spend(6n)).toEqual(["VALID", 0n]);
    expect(await spend(1n)).toEqual(["USAGE_EXCEEDED", 0n]);
    expect((await h().admin.keys.getKey({ id })).key!.credits!.remaining).toBe(0n);
  });

  it("never charges a key without credits anywhere (unlimited)", async () => {
    const { plaintext } = await createKey(h().admin);
    for (let i = 0; i < 3; i++) {
      const r = await verify(h().admin, plaintext, { cost: 1000n });
      expect(r.codeName).toBe("VALID");
      expect(r.creditsRemaining).toBeUndefined();
    }
  });

  it("shares an identity's balance among its keys without their own, and spends a key's own balance first without touching the identity's", async () => {
    const c = h().admin;
    const { identityId, keys } = await createIdentityWithKeys(c, 2, { externalId: unique("org"), credits: credits(5) });
    const own = await createKey(c, { identity: { case: "identityId", value: identityId }, credits: credits(2) });

    expect((await verify(c, own.plaintext)).creditsRemaining).toBe(1n);
    expect((await verify(c, own.plaintext)).creditsRemaining).toBe(0n);
    const ownOut = await verify(c, own.plaintext);
    expect(ownOut.codeName, "a key with its own (empty) balance does not fall back to the identity's").toBe("USAGE_EXCEEDED");
    expect((await c.identities.getIdentity({ lookup: { case: "id", value: identityId } })).identity!.credits!.remaining).toBe(5n);

    const codes: string[] = [];
    for (let i = 0; i < 8; i++) codes.push((await verify(c, keys[i % 2])).codeName);
    expect(codes).toEqual(["VALID", "VALID", "VALID", "VALID", "VALID", "USAGE_EXCEEDED", "USAGE_EXCEEDED", "USAGE_EXCEEDED"]);
    expect((await c.identities.getIdentity({ lookup: { case: "id", value: identityId } })).identity!.credits!.remaining).toBe(0n);

    // Topping the identity up is seen by its keys at once.
    await c.keys.updateCredits({ target: { case: "identityId", value: identityId }, operation: CreditsOperation.INCREMENT, value: 2n });
    expect((await verify(c, keys[1])).creditsRemaining).toBe(1n);
  });

  it("gives exactly 10 VALID out of 100 concurrent verifications against 10 credits, and leaves the balance at 0", async () => {
    const { plaintext, id } = await createKey(h().admin, { credits: credits(10) });
    const codes = await verifyConcurrently(h().admin, [plaintext], 100);
    expect(count(codes, "VALID")).toBe(10);
    expect(count(codes, "USAGE_EXCEEDED")).toBe(90);
    expect((await h().admin.keys.getKey({ id })).key!.credits!.remaining).toBe(0n);
  });

  it("gives exactly 10 VALID out of 100 concurrent verifications over three keys sharing an identity's 10 credits", async () => {
    const { identityId, keys } = await createIdentityWithKeys(h().admin, 3, { externalId: unique("org"), credits: credits(10) });
    const codes = await verifyConcurrently(h().admin, keys, 100);
    expect(count(codes, "VALID")).toBe(10);
    expect(count(codes, "USAGE_EXCEEDED")).toBe(90);
    const { identity } = await h().admin.identities.getIdentity({ lookup: { case: "id", value: identityId } });
    expect(identity!.credits!.remaining).toBe(0n);
  });

  it("spends exactly the admitted costs under concurrency with mixed costs", async () => {
    const { plaintext, id } = await createKey(h().admin, { credits: credits(20) });
    const all = await Promise.all(Array.from({ length: 40 }, (_, i) => verify(h().admin, plaintext, { cost: BigInt((i % 3) + 1) })));
    const spent = all.reduce((s, r, i) => s + (r.codeName === "VALID" ? (i % 3) + 1 : 0), 0);
    const left = (await h().admin.keys.getKey({ id })).key!.credits!.remaining;
    expect(spent + Number(left)).toBe(20);
    expect(Number(left)).toBeGreaterThanOrEqual(0);
    // A balance only shrinks, so every refused cost is larger than what is left at the end.
    for (const [i, r] of all.entries()) if (r.codeName === "USAGE_EXCEEDED") expect(Number(left)).toBeLessThan((i % 3) + 1);
  });
});

/* ---------------------------------------------------------------------------
 * Refills, at the domain level with an injected clock: the verifier as
 * createCore wires it, over a real store, with `now` under the test's control.
 */

const VERIFY_ALL = new Principal("root_test", [{ action: "verify", apiId: null }]);
const input = (key: string, over: Partial<VerifyInput> = {}): VerifyInput => ({
  key,
  apiId: "",
  permissions: "",
  ratelimits: [],
  cost: null,
  tags: [],
  ...over,
});

/** One instance's verifier (own cache, own counter) at the time `clock.now`. */
function instance(store: Store, clock: { now: number }) {
  const now = () => clock.now;
  const cache = createVerificationCache({ store, options: { maxEntries: 1000, ttlMs: 60_000 }, now });
  return createVerifier({ store, cache, counter: createMemoryCounter(), now });
}

async function insertKey(store: Store, over: Partial<KeyRecord>, at: number): Promise<string> {
  const { record, plaintext } = keyRecord({ apiId: "api_refill", ...over }, at);
  await store.createKey(record);
  return plaintext;
}

async function insertIdentity(store: Store, c: Credits, at: number): Promise<IdentityRecord> {
  const rec = identityRecord({ credits: c }, at);
  await store.createIdentity(rec);
  return rec;
}

const utc = (y: number, m: number, d: number, hh = 0, mm = 0, ss = 0, ms = 0) => Date.UTC(y, m - 1, d, hh, mm, ss, ms);

describeEachStore("VerifyKey credit refills (injected clock)", (kind: StoreKind) => {
  let ts: TestStore;
  beforeEach(async () => {
    ts = await openTestStore(kind);
  });
  afterEach(async () => {
    await ts.destroy();
  });

  async function codes(v: ReturnType<typeof instance>, key: string, n: number): Promise<string[]> {
    const out: string[] = [];
    for (let i = 0; i < n; i++) out.push((await v(VERIFY_ALL, input(key))).code);
    return out;
  }

  it("refills a daily balance once at 00:00 UTC, and not again within the day, also on another instance", async () => {
    const clock = { now: utc(2027, 1, 10, 10) };
    const key = await insertKey(
      ts.store,
      { credits: { remaining: 2, refill: { interval: "daily", amount: 5, refillDay: null, lastRefillAt: utc(2027, 1, 10) } } },
      clock.now,
    );
    const a = instance(ts.store, clock);
    expect(await codes(a, key, 3)).toEqual(["VALID", "VALID", "USAGE_EXCEEDED"]);

    clock.now = utc(2027, 1, 10, 23, 59, 59, 999);
    expect(await codes(a, key, 1)).toEqual(["USAGE_EXCEEDED"]);

    clock.now = utc(2027, 1, 11);
    const first = await a(VERIFY_ALL, input(key));
    expect([first.code, first.creditsRemaining]).toEqual(["VALID", 4]);
    expect(await codes(a, key, 5)).toEqual(["VALID", "VALID", "VALID", "VALID", "USAGE_EXCEEDED"]);

    // A second instance, with nothing cached, later the same day: no second refill.
    clock.now = utc(2027, 1, 11, 18);
    const b = instance(ts.store, clock);
    expect(await codes(b, key, 1)).toEqual(["USAGE_EXCEEDED"]);

    clock.now = utc(2027, 1, 12, 0, 0, 1);
    const next = await b(VERIFY_ALL, input(key));
    expect([next.code, next.creditsRemaining]).toEqual(["VALID", 4]);
    const stored = await ts.store.getKeyByHash(hashKey(key));
    expect(stored!.credits!.refill!.lastRefillAt).toBe(utc(2027, 1, 12));
    expect(stored!.credits!.remaining).toBe(4);
  });

  it("sets the balance to the refill amount rather than adding to it", async () => {
    const clock = { now: utc(2027, 6, 1, 12) };
    const key = await insertKey(
      ts.store,
      { credits: { remaining: 3, refill: { interval: "daily", amount: 5, refillDay: null, lastRefillAt: utc(2027, 6, 1) } } },
      clock.now,
    );
    const v = instance(ts.store, clock);
    clock.now = utc(2027, 6, 2, 8);
    const r = await v(VERIFY_ALL, input(key));
    expect([r.code, r.creditsRemaining]).toEqual(["VALID", 4]);
  });

  it("refills a monthly balance with refill_day 31 on the last day of February and April, once", async () => {
    const clock = { now: utc(2027, 1, 31, 9) };
    const key = await insertKey(
      ts.store,
      { credits: { remaining: 0, refill: { interval: "monthly", amount: 10, refillDay: 31, lastRefillAt: utc(2027, 1, 31) } } },
      clock.now,
    );
    const v = instance(ts.store, clock);
    const at = async (t: number) => {
      clock.now = t;
      const r = await v(VERIFY_ALL, input(key));
      return [r.code, r.creditsRemaining];
    };
    expect(await at(utc(2027, 2, 27, 23, 59, 59, 999))).toEqual(["USAGE_EXCEEDED", 0]);
    expect(await at(utc(2027, 2, 28))).toEqual(["VALID", 9]);
    expect(await at(utc(2027, 3, 1))).toEqual(["VALID", 8]);
    expect(await at(utc(2027, 3, 30, 23))).toEqual(["VALID", 7]);
    expect(await at(utc(2027, 3, 31))).toEqual(["VALID", 9]);
    expect(await at(utc(2027, 4, 29))).toEqual(["VALID", 8]);
    expect(await at(utc(2027, 4, 30))).toEqual(["VALID", 9]);
    expect(await at(utc(2027, 5, 1))).toEqual(["VALID", 8]);
  });

  it("refills an identity's shared balance for its keys, once per period", async () => {
    const clock = { now: utc(2027, 3, 5, 12) };
    const identity = await insertIdentity(
      ts.store,
      { remaining: 1, refill: { interval: "monthly", amount: 3, refillDay: 5, lastRefillAt: utc(2027, 3, 5) } },
      clock.now,
    );
    const k1 = await insertKey(ts.store, { identityId: identity.id }, clock.now);
    const k2 = await insertKey(ts.store, { identityId: identity.id }, clock.now);
    const v = instance(ts.store, clock);
    expect([...(await codes(v, k1, 1)), ...(await codes(v, k2, 1))]).toEqual(["VALID", "USAGE_EXCEEDED"]);
    clock.now = utc(2027, 4, 5, 0, 0, 0, 1);
    expect([...(await codes(v, k2, 2)), ...(await codes(v, k1, 2))]).toEqual(["VALID", "VALID", "VALID", "USAGE_EXCEEDED"]);
    expect((await ts.store.getIdentity(identity.id))!.credits!.remaining).toBe(0);
  });

  it("refills once when 30 verifications on two instances race at a period boundary: exactly the refill amount is VALID", async () => {
    const clock = { now: utc(2027, 8, 31, 23) };
    const key = await insertKey(
      ts.store,
      { credits: { remaining: 0, refill: { interval: "daily", amount: 10, refillDay: null, lastRefillAt: utc(2027, 8, 31) } } },
      clock.now,
    );
    const a = instance(ts.store, clock);
    const b = instance(ts.store, clock);
    expect(await codes(a, key, 1)).toEqual(["USAGE_EXCEEDED"]);
    expect(await codes(b, key, 1)).toEqual(["USAGE_EXCEEDED"]);
    clock.now = utc(2027, 9, 1);
    const all = await Promise.all(Array.from({ length: 30 }, (_, i) => (i % 2 ? a : b)(VERIFY_ALL, input(key))));
    expect(all.filter((r) => r.code === "VALID")).toHaveLength(10);
    expect(all.filter((r) => r.code === "USAGE_EXCEEDED")).toHaveLength(20);
  });
});
