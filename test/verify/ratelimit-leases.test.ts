/**
 * Rate-limit leases on the Redis counter (docs/credits.md, "Rate-limit leases"):
 * a take that goes to Redis also takes tokens ahead for the next takes on the
 * pool, so a busy pool costs one round trip per lease. What must hold: no
 * window admits more than its limit however many processes lease; Redis counts
 * exactly what was handed out plus what is leased; near the limit and for small
 * limits every call goes to Redis; leases never cross a window or a changed
 * limit; refunds and a graceful stop give tokens back. Each counter runs on a
 * clock the test sets; the Redis count is read straight from Redis.
 */
import { randomBytes } from "node:crypto";
import { afterAll, beforeAll, beforeEach, expect, it } from "vitest";
import type { Redis } from "ioredis";
import { createCounter } from "../../src/app/counters.js";
import { createRedisClient } from "../../src/app/redis.js";
import { UnavailableError } from "../../src/domain/errors.js";
import { createRedisCounter } from "../../src/ratelimit/counter.js";
import type { Store } from "../../src/storage/store.js";
import { describeWith, redisUrl } from "./support.js";

const MINUTE = 60_000;
const T0 = Math.floor(Date.now() / MINUTE) * MINUTE + 10_000;
const W0 = Math.floor(T0 / MINUTE);
const clock = { now: T0 };
const fresh = (label: string) => `lease:${label}:${randomBytes(6).toString("hex")}`;

describeWith("REDIS_URL", redisUrl(), "rate-limit leases (redis counter)", () => {
  let a: Redis;
  let b: Redis;
  beforeAll(() => {
    a = createRedisClient(redisUrl()!);
    b = createRedisClient(redisUrl()!);
  });
  afterAll(async () => {
    await Promise.all([a.quit(), b.quit()]);
  });
  beforeEach(() => {
    clock.now = T0;
  });
  /** Two processes' counters (each its own client), leasing at most `leaseMax`. */
  const counters = (leaseMax: number) => [a, b].map((c) => createRedisCounter(c, { now: () => clock.now, leaseMax }));
  /** The window's count in Redis (rate-limiter-flexible's key: prefix, counter key, window). */
  const inRedis = async (key: string, window = W0) => Number((await a.get(`lk:${key}:${window}`)) ?? 0);

  it("takes a lease with the first take and hands it out without a round trip, reporting each call's total", async () => {
    const [p] = counters(100);
    const k = fresh("busy");
    expect(await p.take(k, 1, 1_000_000, MINUTE)).toMatchObject({ ok: true, total: 1 });
    expect(await inRedis(k)).toBe(101);
    const totals = [];
    for (let i = 0; i < 100; i++) totals.push((await p.take(k, 1, 1_000_000, MINUTE)).total);
    expect(totals).toEqual(Array.from({ length: 100 }, (_, i) => i + 2));
    expect(await inRedis(k)).toBe(101); // the lease's 100 calls never reached Redis
    expect(await p.take(k, 1, 1_000_000, MINUTE)).toMatchObject({ ok: true, total: 102 });
    expect(await inRedis(k)).toBe(202);
  });

  it("leases once for fifty concurrent takes on one pool", async () => {
    const [p] = counters(100);
    const k = fresh("concurrent");
    const res = await Promise.all(Array.from({ length: 50 }, () => p.take(k, 1, 1_000_000, MINUTE)));
    expect(res.every((r) => r.ok)).toBe(true);
    expect(res.map((r) => r.total).sort((x, y) => x - y)).toEqual(Array.from({ length: 50 }, (_, i) => i + 1));
    expect(await inRedis(k)).toBe(101);
  });

  it("never leases for a small limit, nor when what is left is under 8 × 64: every call goes to Redis", async () => {
    const [p] = counters(1000);
    const small = fresh("small");
    await p.take(small, 1, 100, MINUTE);
    expect(await inRedis(small)).toBe(1);
    const edge = fresh("edge");
    await p.take(edge, 1, 1000 + 511, MINUTE); // 1,510 left after it: a lease of 23
    expect(await inRedis(edge)).toBe(24);
    const near = fresh("near");
    await p.take(near, 1, 512, MINUTE); // 511 left: under 8 × 64
    expect(await inRedis(near)).toBe(1);
  });

  it("admits exactly the limit across two processes: one is refused while the other holds a lease, which the other then hands out", async () => {
    const [p, q] = counters(1000);
    const k = fresh("two");
    expect(await p.take(k, 1, 1000, MINUTE)).toMatchObject({ ok: true }); // p leases floor(999 / 64) = 15
    expect(await inRedis(k)).toBe(16);
    let admittedQ = 0;
    for (let i = 0; i < 1000; i++) if ((await q.take(k, 1, 1000, MINUTE)).ok) admittedQ++;
    expect(await inRedis(k)).toBe(1000);
    expect(admittedQ).toBe(984); // refused while p still holds 15
    let admittedP = 1;
    for (let i = 0; i < 100; i++) if ((await p.take(k, 1, 1000, MINUTE)).ok) admittedP++;
    expect(admittedP).toBe(16);
    expect(admittedP + admittedQ).toBe(1000);
    expect(await inRedis(k)).toBe(1000);
  });

  it("never admits more than the limit when two processes race with leases, and Redis holds what was admitted once leases are returned", async () => {
    const [p, q] = counters(1000);
    const k = fresh("race");
    const limit = 20_000;
    const res = await Promise.all(Array.from({ length: 30_000 }, (_, i) => (i % 2 ? p : q).take(k, 1, limit, MINUTE)));
    const admitted = res.filter((r) => r.ok).length;
    expect(admitted).toBeLessThanOrEqual(limit);
    // Leases still held are counted in Redis: admitted + held = the Redis count, never above the limit.
    expect(await inRedis(k)).toBeLessThanOrEqual(limit);
    await Promise.all([p.returnLeases(), q.returnLeases()]);
    expect(await inRedis(k)).toBe(admitted);
    // With leases returned, the rest of the window is there for whoever asks.
    let more = 0;
    while ((await p.take(k, 1, limit, MINUTE)).ok) more++;
    expect(admitted + more).toBe(limit);
  });

  it("gives a refund back to the lease while the pool leases, and to Redis near the limit", async () => {
    const [p] = counters(100);
    const k = fresh("refund");
    const r = await p.take(k, 5, 1_000_000, MINUTE);
    expect(await inRedis(k)).toBe(105);
    await p.refund(k, 5, MINUTE, r.window);
    expect(await inRedis(k)).toBe(105); // still this process's, in its lease
    expect(await p.take(k, 105, 1_000_000, MINUTE)).toMatchObject({ ok: true, total: 105 });
    expect(await inRedis(k)).toBe(105);
    const near = fresh("refund-near");
    const n = await p.take(near, 3, 100, MINUTE);
    await p.refund(near, 3, MINUTE, n.window);
    expect(await inRedis(near)).toBe(0);
  });

  it("does not carry a lease into the next window, nor a refund from an ended window into it", async () => {
    const [p] = counters(100);
    const k = fresh("window");
    const first = await p.take(k, 1, 1_000_000, MINUTE);
    expect(await inRedis(k, W0)).toBe(101);
    clock.now = first.resetAt;
    expect(await p.take(k, 1, 1_000_000, MINUTE)).toMatchObject({ ok: true, total: 1, window: W0 + 1 });
    expect(await inRedis(k, W0 + 1)).toBe(101);
    await p.refund(k, 1, MINUTE, W0);
    expect(await inRedis(k, W0 + 1)).toBe(101);
    expect(await p.take(k, 100, 1_000_000, MINUTE)).toMatchObject({ ok: true, total: 101 }); // the new lease only
  });

  it("voids a lease when the pool's limit changes, giving its tokens back", async () => {
    const [p] = counters(100);
    const k = fresh("limit");
    await p.take(k, 1, 1_000_000, MINUTE);
    expect(await inRedis(k)).toBe(101);
    expect(await p.take(k, 1, 2_000_000, MINUTE)).toMatchObject({ ok: true, total: 2 });
    expect(await inRedis(k)).toBe(102); // 100 given back, then 1 + a new lease of 100
    // Lowered to what is counted: refused, though the void lease held 100 of the window.
    expect(await p.take(k, 1, 2, MINUTE)).toMatchObject({ ok: false, total: 2 });
    expect(await inRedis(k)).toBe(2);
  });

  it("gives what is left of its leases back at a graceful stop", async () => {
    const [p] = counters(100);
    const k = fresh("stop");
    await p.take(k, 7, 1_000_000, MINUTE);
    expect(await inRedis(k)).toBe(107);
    await p.returnLeases();
    expect(await inRedis(k)).toBe(7);
    expect(await p.take(k, 1, 1_000_000, MINUTE)).toMatchObject({ ok: true, total: 8 });
  });

  it("fails the takes waiting for a lease with UNAVAILABLE when that round trip fails, at once and not one after another; the next take tries Redis again", async () => {
    // A gate in front of the limiter's script (rate-limiter-flexible's `rlflxIncr`):
    // the first call fails (the backend went away); the client itself is not patched.
    let calls = 0;
    const gated = new Proxy(a, {
      get: (target, name) => {
        if (name === "rlflxIncr") {
          return (...args: unknown[]) => (++calls === 1 ? Promise.reject(new Error("injected: connection reset")) : (target as unknown as { rlflxIncr: (...x: unknown[]) => Promise<unknown> }).rlflxIncr(...args));
        }
        const v = Reflect.get(target, name, target) as unknown;
        return typeof v === "function" ? v.bind(target) : v;
      },
    });
    const p = createRedisCounter(gated, { now: () => clock.now, leaseMax: 100 });
    const k = fresh("down");
    const res = await Promise.allSettled(Array.from({ length: 20 }, () => p.take(k, 1, 1_000_000, MINUTE)));
    expect(res.map((r) => r.status)).toEqual(Array(20).fill("rejected"));
    for (const r of res) expect((r as PromiseRejectedResult).reason).toBeInstanceOf(UnavailableError);
    expect(calls).toBe(1); // one round trip for the twenty
    expect(await p.take(k, 1, 1_000_000, MINUTE)).toMatchObject({ ok: true, total: 1 });
    expect(await inRedis(k)).toBe(101);
  });

  it("takes LATCHKEY_RATELIMIT_LEASE_MAX from the configuration: 0 takes every call in Redis", async () => {
    const store = { capabilities: { shared: true, atomicUpdates: true, counterClient: null } } as unknown as Store;
    for (const [leaseMax, counted] of [
      [0, 1],
      [100, 101],
    ]) {
      const made = createCounter({ ratelimitBackend: "redis", ratelimitLeaseMax: leaseMax, redisUrl: redisUrl()!, mongodbDatabase: "x" }, store);
      try {
        const k = fresh(`config-${leaseMax}`);
        const r = await made.counter.take(k, 1, 1_000_000, MINUTE);
        expect(await inRedis(k, r.window)).toBe(counted);
      } finally {
        await made.close();
      }
    }
  });

  it("reads a pool's count with cost 0 without what this process still holds", async () => {
    const [p, q] = counters(100);
    const k = fresh("read");
    await p.take(k, 3, 1_000_000, MINUTE);
    expect(await p.take(k, 0, 1_000_000, MINUTE)).toMatchObject({ ok: true, total: 3 });
    expect(await q.take(k, 0, 1_000_000, MINUTE)).toMatchObject({ ok: true, total: 103 }); // p's lease is taken, as far as q knows
  });
});
