/**
 * Credit leases on the redis credits backend (src/storage/redis-credits.ts;
 * docs/credits.md, "Credit leases"): an instance whose spends of a balance
 * come in batches takes a block of it ahead and spends from it without a round
 * trip — never more than the balance, whatever the instances; what is left
 * goes back (with the next batch, at expiry, at close); an update waits until
 * the leases out are back or expired, and a lease from before an update or a
 * refill gives nothing back into the new balance. Needs MONGODB_URI and
 * REDIS_URL (skipped locally without, failing in CI).
 */
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { createRedisClient } from "../../src/app/redis.js";
import type { IdentityRecord } from "../../src/domain/types.js";
import { MongoStore } from "../../src/storage/mongodb/mongo-store.js";
import { RedisCreditsStore, SPEND_NOW, msToUtcMidnight } from "../../src/storage/redis-credits.js";
import type { SpendResult } from "../../src/storage/store.js";
import { dropDatabase, randomDatabaseName } from "../support/harness.js";
import { identityRecord, keyRecord } from "../support/records.js";
import { describeWith, mongodbUri, redisUrl } from "../verify/support.js";
import { creditWritesContract } from "./credit-writes-contract.js";

const DAY = 86_400_000;
const today = Math.floor(Date.now() / DAY) * DAY;

type Script = (...args: unknown[]) => Promise<unknown>;
interface Counted {
  store: RedisCreditsStore;
  /** Spend scripts sent (either name) with spends in them, with their costs. */
  spends: string[];
  /** Lease returns sent on their own (expiry, close); resolves `returned` each time. */
  returns: number;
  returned: () => Promise<void>;
  /** Update scripts sent (UpdateCredits's, and the set after a write of credits; one that found leases out counts too). */
  updates: number;
}

/** One "instance" with leases on, its Redis scripts counted (in front of the client: its auto-pipelining calls its own methods). */
async function instance(database: string, opts: { leaseMax?: number; leaseMs?: number; leaseIdleMs?: number } = {}): Promise<Counted> {
  const client = createRedisClient(redisUrl()!);
  // A lease goes back when idle only where a test says so (the tests hold leases across awaits).
  const leaseMs = opts.leaseMs ?? 60_000;
  const store = new RedisCreditsStore(new MongoStore({ uri: mongodbUri()!, database }), client, {
    flushMs: 60_000,
    ownsClient: true,
    leaseMax: opts.leaseMax ?? 1000,
    leaseMs,
    leaseIdleMs: opts.leaseIdleMs ?? leaseMs,
  });
  await store.init();
  const holder = store as unknown as { redis: Record<string | symbol, unknown> };
  const redis = holder.redis;
  let wake: (() => void) | null = null;
  const counted: Counted = {
    store,
    spends: [],
    returns: 0,
    returned: () => new Promise<void>((r) => (wake = r)),
    updates: 0,
  };
  holder.redis = new Proxy(redis, {
    get: (target, name) => {
      const v = Reflect.get(target, name, target) as unknown;
      if (typeof v !== "function") return v;
      const fn = (v as Script).bind(target);
      if (name === "lkCreditsSpend" || name === SPEND_NOW)
        return async (...args: unknown[]) => {
          // No costs: a lease given back on its own (expiry, close).
          if (String(args[6]) !== "") counted.spends.push(String(args[6]));
          const res = await fn(...args);
          if (String(args[6]) === "") {
            counted.returns++;
            wake?.();
          }
          return res;
        };
      if (name === "lkCreditsUpdate" || name === "lkCreditsSet")
        return (...args: unknown[]) => {
          counted.updates++;
          return fn(...args);
        };
      return fn;
    },
  });
  return counted;
}

const ones = (n: number) => Array.from({ length: n }, () => 1);

/** The fields of a balance in Redis (see the scripts in src/storage/redis-credits.ts). */
async function redisState(s: RedisCreditsStore, member: string): Promise<Record<string, string>> {
  const { redis, prefix } = s as unknown as { redis: { hgetall(key: string): Promise<Record<string, string>> }; prefix: string };
  return redis.hgetall(prefix + member);
}

describeWith("MONGODB_URI", mongodbUri(), "credit leases (redis credits backend)", () =>
  describeWith("REDIS_URL", redisUrl(), "on Redis", () => {
    describe("the credit-writes contract, with leases on", () =>
      creditWritesContract(async () => {
        const database = randomDatabaseName();
        const { store } = await instance(database);
        return {
          store,
          close: async () => {
            await store.close();
            await dropDatabase(mongodbUri()!, database);
          },
        };
      }, { concurrent: true }));

    let database: string;
    const open: RedisCreditsStore[] = [];
    const start = async (opts?: { leaseMax?: number; leaseMs?: number; leaseIdleMs?: number }) => {
      const c = await instance(database, opts);
      open.push(c.store);
      return c;
    };
    /** A graceful stop (what is left of its leases goes back). */
    const stop = async (c: Counted) => {
      open.splice(open.indexOf(c.store), 1);
      await c.store.close();
    };
    beforeEach(() => {
      database = randomDatabaseName();
    });
    afterEach(async () => {
      vi.restoreAllMocks();
      for (const s of open.splice(0)) await s.close().catch(() => undefined);
      await dropDatabase(mongodbUri()!, database);
    });
    const withCredits = async (s: RedisCreditsStore, remaining: number, refill: NonNullable<IdentityRecord["credits"]>["refill"] = null) => {
      const i = identityRecord({ credits: { remaining, refill } });
      await s.createIdentity(i);
      return { identityId: i.id };
    };
    const balance = async (s: RedisCreditsStore, t: { identityId: string }) => (await s.getIdentity(t.identityId))!.credits!.remaining;
    const spendAll = (s: RedisCreditsStore, t: { identityId: string }, costs: number[]) => Promise.all(costs.map((c) => s.spendCredits(t, c, null)));

    it("spends from a lease without a round trip once spends come in batches; each answer counts down, and what is left goes back at close", async () => {
      const a = await start();
      const t = await withCredits(a.store, 1_000_000);
      await a.store.spendCredits(t, 0, null); // loaded in Redis
      a.spends.length = 0;
      expect((await a.store.spendCredits(t, 1, null)).remaining).toBe(999_999); // a lone spend asks for no lease
      expect(a.spends).toEqual(["1"]);
      const batch = await spendAll(a.store, t, ones(10)); // one turn: one script, which asks for 8 × 10
      expect(batch.map((r) => r.remaining)).toEqual([999_998, 999_997, 999_996, 999_995, 999_994, 999_993, 999_992, 999_991, 999_990, 999_989]);
      expect(a.spends).toHaveLength(2);
      expect(await balance(a.store, t), "Redis holds the balance less the 80 leased").toBe(999_909);
      const fromLease: SpendResult[] = [];
      for (let i = 0; i < 80; i++) fromLease.push(await a.store.spendCredits(t, 1, null));
      expect(a.spends, "80 spends from the lease: no script").toHaveLength(2);
      expect(fromLease.map((r) => [r.ok, r.remaining])).toEqual(Array.from({ length: 80 }, (_, i) => [true, 999_988 - i]));
      // The 81st does not fit: a script, which gives back the empty lease and asks for 2 × (80 + 1).
      expect(await a.store.spendCredits(t, 1, null)).toMatchObject({ ok: true, remaining: 999_908 });
      expect(a.spends).toHaveLength(3);
      expect(await balance(a.store, t)).toBe(999_908 - 162);
      await a.store.spendCredits(t, 5, null);
      await stop(a);
      const b = await start();
      expect(await balance(b.store, t), "what the lease did not spend came back at close").toBe(1_000_000 - 1 - 10 - 80 - 1 - 5);
      await b.store.flush();
      expect((await b.store.inner.getIdentity(t.identityId))!.credits!.remaining).toBe(1_000_000 - 97);
    });

    it("never admits more than the balance over two instances leasing it (50,000 spends of 40,000), and what they admitted plus what is left is the balance", async () => {
      const a = await start();
      const b = await start();
      const t = await withCredits(a.store, 40_000);
      const results: SpendResult[] = [];
      for (let wave = 0; wave < 250; wave++) {
        results.push(...(await Promise.all([a, b].flatMap((s) => ones(100).map((c) => s.store.spendCredits(t, c, null))))));
      }
      const admitted = results.filter((r) => r.ok).length;
      expect(admitted).toBeLessThanOrEqual(40_000);
      expect(a.spends.length + b.spends.length, "leases took most spends off Redis").toBeLessThan(results.length / 4);
      for (const s of [a, b]) await stop(s);
      const c = await start();
      expect(admitted + (await balance(c.store, t))).toBe(40_000);
    });

    it("gives nothing back from a spend whose call ended: it spends nothing from the lease", async () => {
      const a = await start();
      const t = await withCredits(a.store, 1_000_000);
      await spendAll(a.store, t, ones(4)); // a lease of 32
      const ended = new AbortController();
      ended.abort(new Error("the client went away"));
      await expect(a.store.spendCredits(t, 3, null, ended.signal)).rejects.toThrow("the client went away");
      expect(await a.store.spendCredits(t, 1, null)).toMatchObject({ ok: true, remaining: 1_000_000 - 5 });
      await stop(a);
      const b = await start();
      expect(await balance(b.store, t)).toBe(1_000_000 - 5);
    });

    it("stops spending from a lease at its lifetime and gives back the rest by itself", async () => {
      const a = await start({ leaseMs: 50 });
      const t = await withCredits(a.store, 1_000_000);
      await a.store.spendCredits(t, 0, null); // loaded in Redis
      a.spends.length = 0;
      const back = a.returned();
      await spendAll(a.store, t, ones(4)); // a lease of 32, for 50 ms
      expect(await balance(a.store, t)).toBe(1_000_000 - 4 - 32);
      await back;
      expect(await balance(a.store, t)).toBe(1_000_000 - 4);
      await a.store.spendCredits(t, 1, null);
      expect(a.spends, "the expired lease is not spent from").toEqual(["1,1,1,1", "1"]);
    });

    it("gives back a lease nothing was spent from for leaseIdleMs, long before its lifetime ends", async () => {
      const a = await start({ leaseMs: 60_000, leaseIdleMs: 30 });
      const t = await withCredits(a.store, 1_000_000);
      await a.store.spendCredits(t, 0, null); // loaded in Redis
      a.spends.length = 0;
      const back = a.returned();
      await spendAll(a.store, t, ones(4)); // a lease of 32, for a minute
      for (let i = 0; i < 10; i++) expect(await a.store.spendCredits(t, 1, null)).toMatchObject({ ok: true, remaining: 1_000_000 - 5 - i });
      expect(a.spends, "the ten spends came from the lease").toEqual(["1,1,1,1"]);
      await back; // without the idle return: only after the minute (the test times out)
      expect(a.returns).toBe(1);
      expect(await balance(a.store, t), "what the lease did not spend is back").toBe(1_000_000 - 14);
      await a.store.spendCredits(t, 1, null);
      expect(a.spends, "the lease given back is not spent from").toEqual(["1,1,1,1", "1"]);
    });

    it("ends a lease at the next UTC midnight, where every refill period starts", async () => {
      expect(msToUtcMidnight(today + DAY - 10)).toBe(10);
      expect(msToUtcMidnight(today)).toBe(DAY);
      const a = await start({ leaseMs: 60_000 });
      const t = await withCredits(a.store, 1_000_000);
      vi.spyOn(Date, "now").mockReturnValue(today + DAY - 5); // 5 ms before midnight
      await spendAll(a.store, t, ones(4));
      vi.restoreAllMocks();
      const leases = (a.store as unknown as { leases: Map<string, { until: number }> }).leases;
      expect(leases.size).toBe(1);
      expect([...leases.values()][0]!.until - performance.now()).toBeLessThanOrEqual(5);
    });

    it("makes an update wait until the leases out are back: spends from a lease come before it, none after", async () => {
      const a = await start();
      const b = await start();
      const t = await withCredits(a.store, 1_000_000);
      await spendAll(a.store, t, ones(10)); // A leases 80 (for a minute)
      expect(await balance(b.store, t)).toBe(1_000_000 - 10 - 80);
      let applied = false;
      const update = b.store.updateCredits(t, { op: "set", value: 0 }, Date.now(), null).then((r) => {
        applied = true;
        return r;
      });
      // B's set found the lease out and stopped further grants; it asks again until the lease is back.
      await vi.waitUntil(() => b.updates >= 3, { timeout: 5_000, interval: 5 });
      expect(applied).toBe(false);
      expect(await a.store.spendCredits(t, 1, null), "A's lease, before the update").toMatchObject({ ok: true });
      // A lone batch while grants are stopped gets no lease.
      const c = await start();
      await spendAll(c.store, t, ones(10));
      expect((c.store as unknown as { leases: Map<string, unknown> }).leases.size).toBe(0);
      await stop(a); // gives back what is left
      expect(await update).toEqual({ remaining: 0, refill: null });
      expect(applied).toBe(true);
      expect(await balance(b.store, t)).toBe(0);
      expect((await c.store.spendCredits(t, 1, null)).ok).toBe(false);
    });

    it("lets a decrement through once a dead instance's lease has expired, and refuses that lease afterwards", async () => {
      const a = await start({ leaseMs: 200 });
      const b = await start();
      const t = await withCredits(a.store, 1_000_000);
      await spendAll(a.store, t, ones(10)); // A leases 80, for 200 ms
      // A dies: its lease is never given back.
      const leases = (a.store as unknown as { leases: Map<string, { timer: NodeJS.Timeout | null }> }).leases;
      const lost = [...leases.values()][0]!;
      clearTimeout(lost.timer!);
      leases.clear();
      expect(await b.store.updateCredits(t, { op: "decrement", value: 1_000 }, Date.now(), null)).toEqual({ remaining: 1_000_000 - 90 - 1_000, refill: null });
      expect(b.updates).toBeGreaterThan(1); // it waited
      // A late return of the lease (a stalled process come back) names the epoch before the update: refused.
      const back = (a.store as unknown as { returnLease(l: unknown): Promise<number> }).returnLease(lost);
      expect(await back).toBe(0);
      expect(await balance(b.store, t), "the dead lease's 80 stay spent").toBe(1_000_000 - 90 - 1_000);
    });

    it("applies an increment at once, leases out or not (it cannot admit more than the balance), and their rest still comes back", async () => {
      const a = await start();
      const b = await start();
      const t = await withCredits(a.store, 1_000_000);
      await spendAll(a.store, t, ones(10)); // A leases 80 (for a minute)
      expect(await b.store.updateCredits(t, { op: "increment", value: 1_000 }, Date.now(), null)).toEqual({ remaining: 1_000_000 - 90 + 1_000, refill: null });
      expect(b.updates).toBe(1);
      expect(await a.store.spendCredits(t, 1, null)).toMatchObject({ ok: true });
      await stop(a);
      expect(await balance(b.store, t)).toBe(1_000_000 - 11 + 1_000);
    });

    it("updates a balance that two instances spend from all the time: every update goes through, and the balance counts them all exactly", async () => {
      const a = await start({ leaseMs: 100 });
      const b = await start({ leaseMs: 100 });
      const t = await withCredits(a.store, 1_000_000);
      let running = true;
      let admitted = 0;
      const load = async (s: Counted) => {
        while (running) for (const r of await Promise.all(ones(25).map((c) => s.store.spendCredits(t, c, null)))) if (r.ok) admitted++;
      };
      const loads = [load(a), load(b)];
      await vi.waitUntil(() => admitted > 2_000, { timeout: 10_000, interval: 5 });
      // Before, each was a read and a compare-and-set on the balance's sequence number, which the
      // spends moved in between every time: "the balance kept changing; retry", all five.
      for (const op of [{ op: "increment", value: 1_000 }, { op: "decrement", value: 300 }, { op: "increment", value: 50 }] as const) {
        await b.store.updateCredits(t, op, Date.now(), null);
      }
      running = false;
      await Promise.all(loads);
      for (const s of [a, b]) await stop(s);
      const c = await start();
      expect(await balance(c.store, t)).toBe(1_000_000 + 1_000 - 300 + 50 - admitted);
    });

    it("gives nothing back into a balance refilled after the lease was granted", async () => {
      const a = await start();
      const b = await start();
      const t = await withCredits(a.store, 1_000_000, { interval: "daily", amount: 5_000, refillDay: null, lastRefillAt: today });
      await spendAll(a.store, t, ones(10)); // A leases 80 in today's period
      // The next period's refill, applied by B's spend.
      expect(await b.store.spendCredits(t, 1, { periodStart: today + DAY, amount: 5_000 })).toMatchObject({ ok: true, remaining: 4_999, refilledAt: today + DAY });
      await stop(a);
      expect(await balance(b.store, t)).toBe(4_999);
    });

    it("moves a rerolled key's balance only once the leases on it are back, with what they did not spend", async () => {
      const a = await start();
      const b = await start();
      const { record: old } = keyRecord({ credits: { remaining: 1_000_000, refill: null } });
      await a.store.createKey(old);
      await Promise.all(ones(10).map((c) => a.store.spendCredits({ keyId: old.id }, c, null))); // A leases 80
      const { record: next } = keyRecord({ apiId: old.apiId, credits: old.credits });
      const reroll = b.store.rerollKey(old.id, next, Date.now() + 60_000, Date.now());
      await vi.waitUntil(async () => (await redisState(b.store, `k:${old.id}`)).fz !== undefined, { timeout: 5_000, interval: 5 });
      expect(await a.store.spendCredits({ keyId: old.id }, 1, null)).toMatchObject({ ok: true, remaining: 1_000_000 - 11 });
      await stop(a); // 79 back
      await reroll;
      expect((await b.store.getKey(next.id))!.credits!.remaining).toBe(1_000_000 - 11);
      expect(await b.store.spendCredits({ keyId: old.id }, 1, null)).toMatchObject({ ok: true, remaining: 1_000_000 - 12 });
    });

    it("grants no lease near an empty balance: the last 8,192 credits are spent in Redis", async () => {
      const a = await start();
      const t = await withCredits(a.store, 8_200);
      const res = await spendAll(a.store, t, ones(100)); // 8,100 left: 1/1,024 of it is under 8
      expect(res.every((r) => r.ok)).toBe(true);
      expect((a.store as unknown as { leases: Map<string, unknown> }).leases.size).toBe(0);
      expect(await balance(a.store, t)).toBe(8_100);
    });

    it("does not lease with LATCHKEY_CREDITS_LEASE_MAX=0", async () => {
      const a = await start({ leaseMax: 0 });
      const t = await withCredits(a.store, 100_000);
      await a.store.spendCredits(t, 0, null); // loaded in Redis
      a.spends.length = 0;
      await spendAll(a.store, t, ones(10));
      await spendAll(a.store, t, ones(10));
      expect(a.spends).toHaveLength(2);
      expect(await balance(a.store, t)).toBe(100_000 - 20);
    });
  }),
);
