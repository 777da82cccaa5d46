/**
 * One contract for the rate-limit window counters of src/ratelimit/counter.ts:
 * in memory, in MongoDB (MONGODB_URI) and in Redis (REDIS_URL). Each counter
 * runs on a clock the test controls, so windows roll over when the test says.
 * On FerretDB the MongoDB counter is refused by the server (its updates are a
 * read and a write); its single-writer behaviour is still checked here, the
 * concurrent cases only on MongoDB. MongoDB and Redis are skipped locally when
 * not configured and fail in CI when missing.
 */
import { randomBytes } from "node:crypto";
import { createRedisClient } from "../../src/app/redis.js";
import { MongoClient } from "mongodb";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { createMemoryCounter, createMongoCounter, createRedisCounter, type RateLimitCounter } from "../../src/ratelimit/counter.js";
import { dropDatabase, randomDatabaseName } from "../support/harness.js";
import { createCounter } from "../../src/app/counters.js";
import { MongoStore } from "../../src/storage/mongodb/mongo-store.js";
import { describeWith, isFerretDb, mongodbUri, redisUrl } from "./support.js";

const MINUTE = 60_000;

/** A counter key no other test (or server sharing the backend) uses. */
const fresh = (label: string) => `contract:${label}:${randomBytes(6).toString("hex")}`;

/** The test's clock: starts inside a minute-aligned window, moved by the test. */
const clock = { now: 0 };
const T0 = Math.floor(Date.now() / MINUTE) * MINUTE + 10_000;

type Open = (now: () => number) => Promise<{ counter: RateLimitCounter; close: () => Promise<void> }>;

function counterContract(open: Open, opts: { concurrent: boolean } = { concurrent: true }): void {
  let counter: RateLimitCounter;
  let close: () => Promise<void>;
  beforeAll(async () => {
    ({ counter, close } = await open(() => clock.now));
  });
  afterAll(async () => {
    await close?.();
  });
  beforeEach(() => {
    clock.now = T0;
  });
  const total = async (k: string, limit = 1000, d = MINUTE) => (await counter.take(k, 0, limit, d)).total;

  it("reads an empty window: total 0, the window containing now, its end", async () => {
    const r = await counter.take(fresh("empty"), 0, 10, MINUTE);
    expect(r).toEqual({ ok: true, total: 0, window: Math.floor(T0 / MINUTE), resetAt: (Math.floor(T0 / MINUTE) + 1) * MINUTE });
  });

  it("takes the cost while it fits under the limit, and reports the window's total", async () => {
    const k = fresh("take");
    expect(await counter.take(k, 1, 10, MINUTE)).toMatchObject({ ok: true, total: 1 });
    expect(await counter.take(k, 2, 10, MINUTE)).toMatchObject({ ok: true, total: 3 });
    expect(await total(k)).toBe(3);
  });

  it("refuses a cost that does not fit without adding it: 9 of 10 used, 5 is refused and 1 still fits", async () => {
    const k = fresh("exact");
    await counter.take(k, 9, 10, MINUTE);
    expect(await counter.take(k, 5, 10, MINUTE)).toMatchObject({ ok: false, total: 9 });
    expect(await total(k)).toBe(9);
    expect(await counter.take(k, 1, 10, MINUTE)).toMatchObject({ ok: true, total: 10 });
    expect(await counter.take(k, 1, 10, MINUTE)).toMatchObject({ ok: false, total: 10 });
  });

  it("refuses a cost above the limit, adding nothing", async () => {
    const k = fresh("above");
    expect(await counter.take(k, 11, 10, MINUTE)).toMatchObject({ ok: false, total: 0 });
    expect(await total(k)).toBe(0);
  });

  it("checks with cost 0: admitted while something is left, refused at the limit, never takes", async () => {
    const k = fresh("check");
    await counter.take(k, 2, 3, MINUTE);
    expect(await counter.take(k, 0, 3, MINUTE)).toMatchObject({ ok: true, total: 2 });
    await counter.take(k, 1, 3, MINUTE);
    expect(await counter.take(k, 0, 3, MINUTE)).toMatchObject({ ok: false, total: 3 });
    expect(await total(k)).toBe(3);
  });

  it("gives a refund back to its window, never below zero", async () => {
    const k = fresh("refund");
    const r = await counter.take(k, 5, 10, MINUTE);
    await counter.refund(k, 2, MINUTE, r.window);
    expect(await total(k)).toBe(3);
    await counter.refund(k, 7, MINUTE, r.window);
    expect(await total(k)).toBe(0);
    await counter.refund(k, 1, MINUTE, r.window);
    expect(await counter.take(k, 1, 10, MINUTE)).toMatchObject({ ok: true, total: 1 });
  });

  it("starts each window at zero at a multiple of the duration, and reports where it ends", async () => {
    const k = fresh("windows");
    const first = await counter.take(k, 3, 10, MINUTE);
    clock.now = first.resetAt - 1;
    expect(await counter.take(k, 1, 10, MINUTE)).toMatchObject({ ok: true, total: 4, window: first.window, resetAt: first.resetAt });
    clock.now = first.resetAt;
    expect(await counter.take(k, 1, 10, MINUTE)).toEqual({ ok: true, total: 1, window: first.window + 1, resetAt: first.resetAt + MINUTE });
  });

  it("does not take a refund made after its window ended out of the next window", async () => {
    const k = fresh("late-refund");
    const old = await counter.take(k, 4, 10, MINUTE);
    clock.now = old.resetAt + 5;
    await counter.take(k, 3, 10, MINUTE);
    await counter.refund(k, 4, MINUTE, old.window);
    expect(await total(k)).toBe(3);
  });

  it("keeps keys apart, and counts one key under a changed limit", async () => {
    const a = fresh("a");
    const b = fresh("b");
    await counter.take(a, 7, 10, MINUTE);
    expect(await counter.take(b, 1, 10, MINUTE)).toMatchObject({ total: 1 });
    expect(await counter.take(a, 4, 10, MINUTE)).toMatchObject({ ok: false, total: 7 });
    expect(await counter.take(a, 4, 20, MINUTE)).toMatchObject({ ok: true, total: 11 });
  });

  if (!opts.concurrent) return;

  it("admits exactly the limit from 50 concurrent takes, each seeing a distinct total", async () => {
    const k = fresh("concurrent");
    const res = await Promise.all(Array.from({ length: 50 }, () => counter.take(k, 1, 30, MINUTE)));
    expect(res.filter((r) => r.ok)).toHaveLength(30);
    expect(res.filter((r) => r.ok).map((r) => r.total).sort((x, y) => x - y)).toEqual(Array.from({ length: 30 }, (_, i) => i + 1));
    expect(await total(k)).toBe(30);
  });

  it("admits every concurrent take that fits alone: with 9 of 10 used, a cost of 1 is admitted among twenty of 5", async () => {
    const k = fresh("fits-alone");
    await counter.take(k, 9, 10, MINUTE);
    const res = await Promise.all([...Array.from({ length: 20 }, () => counter.take(k, 5, 10, MINUTE)), counter.take(k, 1, 10, MINUTE)]);
    expect(res.map((r) => r.ok)).toEqual([...Array(20).fill(false), true]);
    expect(await total(k)).toBe(10);
  });

  it("balances concurrent takes and refunds exactly", async () => {
    const k = fresh("balance");
    const w = (await counter.take(k, 30, 100, MINUTE)).window;
    await Promise.all(Array.from({ length: 60 }, (_, i) => (i % 2 ? counter.take(k, 1, 100, MINUTE) : counter.refund(k, 1, MINUTE, w))));
    expect(await total(k)).toBe(30);
  });
}

describe("memory rate-limit counter", () => {
  counterContract(async (now) => ({ counter: createMemoryCounter({ now }), close: async () => undefined }));

  it("is kind memory", () => {
    expect(createMemoryCounter().kind).toBe("memory");
  });
});

describeWith("MONGODB_URI", mongodbUri(), "mongodb rate-limit counter", () => {
  const open: Open = async (now) => {
    const uri = mongodbUri()!;
    const database = randomDatabaseName();
    const client = new MongoClient(uri, { serverSelectionTimeoutMS: 5000 });
    await client.connect();
    return {
      counter: createMongoCounter(client, database, { now }),
      close: async () => {
        await client.close();
        await dropDatabase(uri, database);
      },
    };
  };
  if (isFerretDb()) {
    // FerretDB applies updates as a read and a write, so concurrent takes could
    // over-admit: the server refuses this backend there (and counts in process by
    // default). What one writer sees is the same as on MongoDB.
    it("is refused on FerretDB, and the default falls back to counting in process", async () => {
      const store = new MongoStore({ uri: mongodbUri()!, database: randomDatabaseName() });
      await store.init();
      try {
        expect(store.flavor).toBe("ferretdb");
        const base = { redisUrl: null, mongodbDatabase: "x", ratelimitLeaseMax: 0 };
        expect(() => createCounter({ ...base, ratelimitBackend: "mongodb" }, store)).toThrow(/needs MongoDB/);
        expect(createCounter({ ...base, ratelimitBackend: "auto" }, store).counter.kind).toBe("memory");
      } finally {
        await store.close();
      }
    });
    describe("with one writer (on FerretDB)", () => counterContract(open, { concurrent: false }));
    return;
  }
  counterContract(open);
});

describeWith("REDIS_URL", redisUrl(), "redis rate-limit counter", () => {
  counterContract(async (now) => {
    // The client a server makes (auto-pipelining on): the contract holds for many takes in one write.
    const client = createRedisClient(redisUrl()!);
    return { counter: createRedisCounter(client, { now }), close: async () => void (await client.quit()) };
  });

  describe("with leases (LATCHKEY_RATELIMIT_LEASE_MAX, the server's default): the contract's limits are too small to lease, so nothing changes", () =>
    counterContract(async (now) => {
      const client = createRedisClient(redisUrl()!);
      return { counter: createRedisCounter(client, { now, leaseMax: 1000 }), close: async () => void (await client.quit()) };
    }));

  it("admits a first take made in the same turn of the event loop as another command on its client (its clock sync)", async () => {
    // rate-limiter-flexible defines its script on the client with its first limiter;
    // an auto-pipeline opened earlier in the same turn lacked it and the take failed.
    const client = createRedisClient(redisUrl()!);
    try {
      const counter = createRedisCounter(client); // sends TIME at once
      expect(await counter.take(fresh("first-turn"), 1, 10, MINUTE)).toMatchObject({ ok: true, total: 1 });
      counter.stop();
    } finally {
      await client.quit();
    }
  });

  it("follows Redis's clock: windows agree with Redis TIME, not with a skewed process clock", async () => {
    const client = createRedisClient(redisUrl()!);
    try {
      // This process's clock is an hour behind; after syncing, windows are Redis's.
      const counter = createRedisCounter(client, { now: () => Date.now() - 3_600_000 });
      await counter.syncClock();
      const [s] = (await client.time()) as unknown as [string, string];
      const r = await counter.take(fresh("clock"), 1, 10, MINUTE);
      expect(Math.abs(r.window - Math.floor((Number(s) * 1000) / MINUTE))).toBeLessThanOrEqual(1);
    } finally {
      await client.quit();
    }
  });
});
