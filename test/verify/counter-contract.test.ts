/**
 * One contract for the three rate-limit window counters of
 * src/ratelimit/counter.ts: in memory, in MongoDB (MONGODB_URI; FerretDB in
 * CI) and in Redis (REDIS_URL). MongoDB and Redis are skipped locally when not
 * configured and fail in CI when missing.
 */
import { randomBytes } from "node:crypto";
import { Redis } from "ioredis";
import { MongoClient } from "mongodb";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createMemoryCounter, createMongoCounter, createRedisCounter, type RateLimitCounter } from "../../src/ratelimit/counter.js";
import { dropDatabase, randomDatabaseName } from "../support/harness.js";
import { createCounter } from "../../src/ratelimit/create-counter.js";
import { MongoStore } from "../../src/storage/mongodb/mongo-store.js";
import { describeWith, isFerretDb, mongodbUri, redisUrl, sleep, within } from "./support.js";

const MINUTE = 60_000;

/** A counter key no other test (or server sharing the backend) uses. */
const fresh = (label: string) => `contract:${label}:${randomBytes(6).toString("hex")}`;

function counterContract(open: () => Promise<{ counter: RateLimitCounter; close: () => Promise<void> }>): void {
  let counter: RateLimitCounter;
  let close: () => Promise<void>;
  beforeAll(async () => {
    ({ counter, close } = await open());
  });
  afterAll(async () => {
    await close?.();
  });

  it("reads a total of 0 with the whole window ahead for a key never added to", async () => {
    expect(await counter.add(fresh("empty"), 0, MINUTE)).toEqual({ total: 0, resetInMs: MINUTE });
  });

  it("adds the cost to the window's total and reports the time left in the window", async () => {
    const k = fresh("add");
    const first = await counter.add(k, 1, MINUTE);
    expect(first.total).toBe(1);
    expect(first.resetInMs).toBeGreaterThan(0);
    expect(first.resetInMs).toBeLessThanOrEqual(MINUTE);
    const second = await counter.add(k, 2, MINUTE);
    expect(second.total).toBe(3);
    expect(second.resetInMs).toBeLessThanOrEqual(first.resetInMs);
  });

  it("reads without changing the total when the cost is 0", async () => {
    const k = fresh("read");
    await counter.add(k, 3, MINUTE);
    expect((await counter.add(k, 0, MINUTE)).total).toBe(3);
    expect((await counter.add(k, 0, MINUTE)).total).toBe(3);
    expect((await counter.add(k, 1, MINUTE)).total).toBe(4);
  });

  it("takes back with subtract what was added; subtracting 0 changes nothing", async () => {
    const k = fresh("subtract");
    await counter.add(k, 5, MINUTE);
    await counter.subtract(k, 2, MINUTE);
    expect((await counter.add(k, 0, MINUTE)).total).toBe(3);
    await counter.subtract(k, 0, MINUTE);
    expect((await counter.add(k, 0, MINUTE)).total).toBe(3);
    await counter.subtract(k, 3, MINUTE);
    expect((await counter.add(k, 0, MINUTE)).total).toBe(0);
  });

  it("keeps keys apart", async () => {
    const a = fresh("a");
    const b = fresh("b");
    await counter.add(a, 7, MINUTE);
    expect((await counter.add(b, 1, MINUTE)).total).toBe(1);
    expect((await counter.add(a, 0, MINUTE)).total).toBe(7);
  });

  it("counts 50 concurrent adds exactly: each sees a distinct running total", async () => {
    const k = fresh("concurrent");
    const res = await Promise.all(Array.from({ length: 50 }, () => counter.add(k, 1, MINUTE)));
    expect(res.map((r) => r.total).sort((x, y) => x - y)).toEqual(Array.from({ length: 50 }, (_, i) => i + 1));
    expect((await counter.add(k, 0, MINUTE)).total).toBe(50);
  });

  it("balances concurrent adds and subtracts exactly", async () => {
    const k = fresh("balance");
    await counter.add(k, 30, MINUTE);
    await Promise.all(Array.from({ length: 60 }, (_, i) => (i % 2 ? counter.add(k, 1, MINUTE) : counter.subtract(k, 1, MINUTE))));
    expect((await counter.add(k, 0, MINUTE)).total).toBe(30);
  });

  it("keeps a fixed window: a later add does not push the window's end back", async () => {
    const k = fresh("fixed");
    const first = await counter.add(k, 1, MINUTE);
    await sleep(150);
    const later = await counter.add(k, 1, MINUTE);
    expect(later.total).toBe(2);
    expect(later.resetInMs).toBeLessThanOrEqual(first.resetInMs - 100);
  });

  it("ends a window after its duration; the next window starts from zero and runs its full length", async () => {
    const k = fresh("expiry");
    await counter.add(k, 3, 1000);
    await within(3000, 50, async () => {
      const r = await counter.add(k, 0, 1000);
      return { ok: r.total === 0, seen: r };
    });
    const next = await counter.add(k, 1, 1000);
    expect(next.total).toBe(1);
    expect(next.resetInMs).toBeGreaterThan(500);
  });

  it("keeps the window it was given: a 2 s window lasts 2 s, not 1 s", async () => {
    const r = await counter.add(fresh("window"), 1, 2000);
    expect(r.resetInMs).toBeGreaterThan(1000);
    expect(r.resetInMs).toBeLessThanOrEqual(2000);
  });

  it("does not carry a subtract made after the window ended into the next window", async () => {
    const k = fresh("late-refund");
    await counter.add(k, 1, 1000);
    await within(3000, 50, async () => {
      const r = await counter.add(k, 0, 1000);
      return { ok: r.total === 0, seen: r };
    });
    // A refund that arrives after the window it belonged to has ended.
    await counter.subtract(k, 1, 1000);
    expect((await counter.add(k, 0, 1000)).total).toBe(0);
    expect((await counter.add(k, 1, 1000)).total).toBe(1);
  });
}

describe("memory rate-limit counter", () => {
  counterContract(async () => ({ counter: createMemoryCounter(), close: async () => undefined }));

  it("is kind memory", () => {
    expect(createMemoryCounter().kind).toBe("memory");
  });
});

describeWith("MONGODB_URI", mongodbUri(), "mongodb rate-limit counter", () => {
  if (isFerretDb()) {
    // FerretDB applies $inc as a read and a write, so the MongoDB limiter would
    // over-admit; the server must refuse it there (and count in process by default).
    it("is refused on FerretDB, and the default falls back to counting in process", async () => {
      const store = new MongoStore({ uri: mongodbUri()!, database: randomDatabaseName() });
      await store.init();
      try {
        expect(store.flavor).toBe("ferretdb");
        const base = { redisUrl: null, mongodbDatabase: "x" };
        expect(() => createCounter({ ...base, ratelimitBackend: "mongodb" }, store)).toThrow(/needs MongoDB/);
        expect(createCounter({ ...base, ratelimitBackend: "auto" }, store).counter.kind).toBe("memory");
      } finally {
        await store.close();
      }
    });
    return;
  }
  counterContract(async () => {
    const uri = mongodbUri()!;
    const database = randomDatabaseName();
    const client = new MongoClient(uri, { serverSelectionTimeoutMS: 5000 });
    await client.connect();
    const counter = createMongoCounter(client, database);
    // The limiter creates its unique index in the background; a server creates its
    // counter at start, long before the first verification, so wait for it here.
    await within(10_000, 50, async () => {
      const names = await client
        .db(database)
        .collection("ratelimits")
        .listIndexes()
        .toArray()
        .catch(() => []);
      return { ok: names.some((i) => i.unique), seen: names.map((i) => i.name) };
    });
    return {
      counter,
      close: async () => {
        await client.close();
        await dropDatabase(uri, database);
      },
    };
  });
});

describeWith("REDIS_URL", redisUrl(), "redis rate-limit counter", () => {
  counterContract(async () => {
    const client = new Redis(redisUrl()!, { maxRetriesPerRequest: 2, lazyConnect: true });
    await client.connect();
    return { counter: createRedisCounter(client), close: async () => void (await client.quit()) };
  });
});
