import type { Redis } from "ioredis";
import type { MongoClient } from "mongodb";
import { RateLimiterMemory, RateLimiterMongo, RateLimiterRedis, type RateLimiterAbstract, type RateLimiterRes } from "rate-limiter-flexible";
import { UnavailableError } from "../domain/errors.js";

/**
 * Window counters behind rate limits. rate-limiter-flexible keeps the counts
 * (in process, in MongoDB or in Redis); deciding against each limit is ours,
 * so one counter serves limits of any size and window: the limiter is created
 * with an unreachable point budget and each call passes its window as
 * `customDuration`. `add` never refuses: the verifier compares the total with
 * the limit and takes the cost back with `subtract` when the verification is
 * refused (all or nothing).
 */
export interface RateLimitCounter {
  readonly kind: "memory" | "mongodb" | "redis";
  /** Adds `cost` to the current window of `key`; returns the window total and the time to its end. */
  add(key: string, cost: number, durationMs: number): Promise<{ total: number; resetInMs: number }>;
  /** Takes back `cost` added to the current window. */
  subtract(key: string, cost: number, durationMs: number): Promise<void>;
}

const BUDGET = Number.MAX_SAFE_INTEGER;

function fromLimiter(kind: RateLimitCounter["kind"], limiter: RateLimiterAbstract): RateLimitCounter {
  const wrapErr = (err: unknown): never => {
    // rate-limiter-flexible rejects with a RateLimiterRes only when over budget, which
    // cannot happen here; any other rejection is the backend failing.
    throw err instanceof Error ? new UnavailableError(`rate-limit backend (${kind}): ${err.message}`) : err;
  };
  return {
    kind,
    async add(key, cost, durationMs) {
      const opts = { customDuration: durationMs / 1000 };
      let res: RateLimiterRes | null;
      try {
        res = cost > 0 ? await limiter.penalty(key, cost, opts) : await limiter.get(key, opts);
      } catch (err) {
        return wrapErr(err);
      }
      if (!res) return { total: 0, resetInMs: durationMs };
      return { total: res.consumedPoints, resetInMs: res.msBeforeNext >= 0 ? res.msBeforeNext : durationMs };
    },
    async subtract(key, cost, durationMs) {
      if (cost <= 0) return;
      const opts = { customDuration: durationMs / 1000 };
      try {
        const res = await limiter.reward(key, cost, opts);
        // The window this cost was added to may have ended since: a refund must not
        // start the next window below zero (that would admit extra calls in it).
        if (res.consumedPoints < 0) await limiter.penalty(key, -res.consumedPoints, opts);
      } catch (err) {
        wrapErr(err);
      }
    },
  };
}

export function createMemoryCounter(): RateLimitCounter {
  return fromLimiter("memory", new RateLimiterMemory({ points: BUDGET, duration: 60, keyPrefix: "lk" }));
}

/** Counts in MongoDB (collection `ratelimits` of `dbName`), shared by every instance. */
export function createMongoCounter(client: MongoClient, dbName: string): RateLimitCounter {
  const limiter = new RateLimiterMongo({
    storeClient: client,
    dbName,
    tableName: "ratelimits",
    points: BUDGET,
    duration: 60,
    keyPrefix: "lk",
    disableIndexesCreation: true,
  });
  // Created here, each on its own: the limiter stops at its first failing index, and
  // FerretDB has no TTL indexes. The unique index is the one counting relies on
  // (expired windows are then replaced in place); the TTL index only tidies up.
  const coll = client.db(dbName).collection("ratelimits");
  coll.createIndex({ key: 1 }, { unique: true }).catch((err: Error) => process.emitWarning(`ratelimits unique index: ${err.message}`));
  coll.createIndex({ expire: -1 }, { expireAfterSeconds: 0 }).catch(() => undefined);
  return fromLimiter("mongodb", limiter);
}

/** Counts in Redis, shared by every instance. */
export function createRedisCounter(client: Redis): RateLimitCounter {
  return fromLimiter("redis", new RateLimiterRedis({ storeClient: client, points: BUDGET, duration: 60, keyPrefix: "lk" }));
}
