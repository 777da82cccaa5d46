import type { Redis } from "ioredis";
import type { Collection, MongoClient } from "mongodb";
import { MongoServerError } from "mongodb";
import { RateLimiterMemory, RateLimiterRedis, RateLimiterRes, type RateLimiterAbstract } from "rate-limiter-flexible";
import { UnavailableError } from "../domain/errors.js";
import type { RateLimitCounter } from "../domain/ports/rate-limit-counter.js";

/** The port these implement (exact admission, windows, refunds): src/domain/ports/rate-limit-counter.ts. */
export type { RateLimitCounter, Taken } from "../domain/ports/rate-limit-counter.js";

const windowOf = (now: number, durationMs: number) => Math.floor(now / durationMs);
const fits = (total: number, cost: number, limit: number) => (cost > 0 ? total + cost <= limit : total < limit);
/** How long (whole seconds, at least 1) a window's count must be kept from `now`: to its end, plus a second. */
const keepSeconds = (window: number, durationMs: number, now: number) => Math.max(1, Math.ceil(((window + 1) * durationMs - now) / 1000) + 1);

function backendError(kind: RateLimitCounter["kind"], err: unknown): never {
  if (err instanceof UnavailableError) throw err;
  throw new UnavailableError(`rate-limit backend (${kind}): ${err instanceof Error ? err.message : String(err)}`);
}

/**
 * In-process counting with rate-limiter-flexible's memory limiter as the store
 * of window counts. Its `consume` counts a refused call too, so calls on one
 * counter key are queued and a take adds its cost, then — only if the total no
 * longer fits — takes it back before the next call on that key runs: no call
 * ever sees a count a refused call left behind.
 */
export function createMemoryCounter(opts: { now?: () => number } = {}): RateLimitCounter {
  const now = opts.now ?? Date.now;
  const limiter = new RateLimiterMemory({ points: Number.MAX_SAFE_INTEGER, duration: 60, keyPrefix: "lk" });
  // Counter keys being worked on, with the calls waiting for each, in order (null:
  // none waiting, so an uncontended call allocates no list and no promise of its
  // own); each call hands the key to the next when it is done.
  const busy = new Map<string, (() => void)[] | null>();
  /**
   * Takes `key`: at once (undefined) when no call holds it, else a promise that
   * resolves at this call's turn. `release` must follow.
   */
  function acquire(key: string): Promise<void> | undefined {
    if (!busy.has(key)) {
      busy.set(key, null);
      return undefined;
    }
    let queue = busy.get(key);
    if (!queue) busy.set(key, (queue = []));
    const q = queue;
    return new Promise<void>((go) => q.push(go));
  }
  function release(key: string): void {
    const next = busy.get(key)?.shift();
    if (next) next();
    else busy.delete(key);
  }
  // A record past its end (its clean-up timer not yet run) counts as an empty window.
  const totalOf = (res: RateLimiterRes | null) => (res && res.msBeforeNext > 0 ? res.consumedPoints : 0);
  return {
    kind: "memory",
    async take(key, cost, limit, durationMs) {
      const t = now();
      const window = windowOf(t, durationMs);
      const k = `${key}:${window}`;
      const wait = acquire(k);
      if (wait) await wait;
      try {
        const resetAt = (window + 1) * durationMs;
        if (cost === 0) {
          const total = totalOf(await limiter.get(k));
          return { ok: fits(total, cost, limit), total, window, resetAt };
        }
        const res = await limiter.penalty(k, cost, { customDuration: keepSeconds(window, durationMs, t) });
        if (res.consumedPoints <= limit) return { ok: true, total: res.consumedPoints, window, resetAt };
        // Refused: the cost goes back before any other call on this key runs.
        await limiter.reward(k, cost, { customDuration: keepSeconds(window, durationMs, t) });
        return { ok: false, total: res.consumedPoints - cost, window, resetAt };
      } finally {
        release(k);
      }
    },
    async refund(key, cost, _durationMs, window) {
      if (cost <= 0) return;
      const k = `${key}:${window}`;
      const wait = acquire(k);
      if (wait) await wait;
      try {
        const total = totalOf(await limiter.get(k));
        if (total > 0) await limiter.reward(k, Math.min(cost, total));
      } finally {
        release(k);
      }
    },
  };
}

/*
 * Redis: rate-limiter-flexible's Redis limiter with our own increment script
 * (its `customIncrTtlLuaScript` option). The script adds the points only when
 * the window's count plus the points stays within the limiter's points (one
 * limiter per limit value, so ARGV[3] is the limit), and returns the count the
 * call would have reached otherwise, which the limiter reports as a refusal.
 * A negative amount (the limiter's `reward`) is a refund: it lowers an existing
 * window's count, never below zero, and never creates a window. The window
 * number is part of the key, so a refund names the window it belongs to.
 */
const TAKE_SCRIPT = `
local points = tonumber(ARGV[1])
local current = tonumber(redis.call('get', KEYS[1]) or '0')
if points < 0 then
  if current <= 0 then return {0, -2} end
  local left = redis.call('decrby', KEYS[1], math.min(-points, current))
  return {left, redis.call('pttl', KEYS[1])}
end
if current + points > tonumber(ARGV[3]) then
  return {current + points, redis.call('pttl', KEYS[1])}
end
redis.call('set', KEYS[1], 0, 'EX', ARGV[2], 'NX')
local consumed = redis.call('incrby', KEYS[1], points)
return {consumed, redis.call('pttl', KEYS[1])}
`;

/** How many limiters (one per distinct limit value) are kept; older ones are dropped first. */
const MAX_LIMITERS = 1024;

/**
 * Counts in Redis, shared by every instance. Windows follow Redis's clock: the
 * offset of this process's clock to Redis `TIME` is measured at start and every
 * minute, so all instances agree on window boundaries to within a round trip.
 */
export function createRedisCounter(client: Redis, opts: { now?: () => number } = {}): RateLimitCounter & { syncClock(): Promise<void>; stop(): void } {
  const localNow = opts.now ?? Date.now;
  let offset = 0;
  const limiters = new Map<number, RateLimiterAbstract>();
  const limiterFor = (limit: number) => {
    let l = limiters.get(limit);
    if (l) {
      limiters.delete(limit);
    } else {
      l = new RateLimiterRedis({ storeClient: client, points: limit, duration: 60, keyPrefix: "lk", customIncrTtlLuaScript: TAKE_SCRIPT });
      if (limiters.size >= MAX_LIMITERS) limiters.delete(limiters.keys().next().value!);
    }
    limiters.set(limit, l);
    return l;
  };
  const syncClock = async () => {
    const before = localNow();
    const [s, us] = (await client.time()) as unknown as [string, string];
    const after = localNow();
    offset = Number(s) * 1000 + Math.floor(Number(us) / 1000) - (before + after) / 2;
  };
  let timer: NodeJS.Timeout | null = null;
  if (!opts.now) {
    syncClock().catch(() => undefined);
    timer = setInterval(() => void syncClock().catch(() => undefined), 60_000);
    timer.unref();
  }
  return {
    kind: "redis",
    syncClock,
    stop: () => {
      if (timer) clearInterval(timer);
    },
    async take(key, cost, limit, durationMs) {
      const t = localNow() + offset;
      const window = windowOf(t, durationMs);
      const k = `${key}:${window}`;
      const resetAt = (window + 1) * durationMs;
      const limiter = limiterFor(limit);
      try {
        if (cost === 0) {
          const total = (await limiter.get(k))?.consumedPoints ?? 0;
          return { ok: total < limit, total, window, resetAt };
        }
        const res = await limiter.consume(k, cost, { customDuration: keepSeconds(window, durationMs, t) });
        return { ok: true, total: res.consumedPoints, window, resetAt };
      } catch (err) {
        // A RateLimiterRes is the script's refusal: nothing was added.
        if (err instanceof RateLimiterRes) return { ok: false, total: err.consumedPoints - cost, window, resetAt };
        return backendError("redis", err);
      }
    },
    async refund(key, cost, durationMs, window) {
      if (cost <= 0) return;
      try {
        await limiterFor(1).reward(`${key}:${window}`, cost, { customDuration: keepSeconds(window, durationMs, localNow() + offset) });
      } catch (err) {
        backendError("redis", err);
      }
    },
  };
}

type WindowDoc = { _id: string; c: number; exp: Date };

/** A unique-index violation (FerretDB on SQLite reports one from an upsert as code 1). */
function isDuplicate(err: unknown): boolean {
  return err instanceof MongoServerError && (err.code === 11000 || (err.code === 1 && /UNIQUE constraint failed/.test(err.message)));
}

/**
 * Counts in MongoDB (collection `ratelimit_windows`), shared by every instance.
 * rate-limiter-flexible's MongoDB limiter adds with an unconditional `$inc`, so
 * a take here is our own conditional upsert: `{_id, c ≤ limit − cost}` with
 * `$inc`. It relies on MongoDB applying a single-document update with its filter
 * atomically, and on the unique `_id` (a refused take's upsert collides with the
 * existing window document). FerretDB applies updates as a read and a write,
 * so the server refuses this backend there (src/app/counters.ts).
 * Windows follow this process's clock.
 */
export function createMongoCounter(client: MongoClient, dbName: string, opts: { now?: () => number } = {}): RateLimitCounter {
  const now = opts.now ?? Date.now;
  const coll: Collection<WindowDoc> = client.db(dbName).collection<WindowDoc>("ratelimit_windows");
  // Tidies up ended windows on MongoDB (FerretDB has no TTL indexes; nothing depends on it).
  coll.createIndex({ exp: 1 }, { expireAfterSeconds: 0 }).catch(() => undefined);
  const read = async (id: string) => (await coll.findOne({ _id: id }))?.c ?? 0;
  return {
    kind: "mongodb",
    async take(key, cost, limit, durationMs) {
      const t = now();
      const window = windowOf(t, durationMs);
      const _id = `${key}|${window}`;
      const resetAt = (window + 1) * durationMs;
      try {
        for (let attempt = 0; ; attempt++) {
          if (cost === 0 || cost > limit) {
            const total = await read(_id);
            return { ok: fits(total, cost, limit), total, window, resetAt };
          }
          try {
            const doc = await coll.findOneAndUpdate(
              { _id, c: { $lte: limit - cost } },
              { $inc: { c: cost }, $setOnInsert: { exp: new Date(resetAt + 1000) } },
              { upsert: true, returnDocument: "after" },
            );
            return { ok: true, total: doc!.c, window, resetAt };
          } catch (err) {
            if (!isDuplicate(err)) throw err;
            // Either the window is full (the filter did not match an existing
            // document) or two first takes raced to create it: read and decide.
            const total = await read(_id);
            if (!fits(total, cost, limit) || attempt >= 3) return { ok: false, total, window, resetAt };
          }
        }
      } catch (err) {
        return backendError("mongodb", err);
      }
    },
    async refund(key, cost, _durationMs, window) {
      if (cost <= 0) return;
      const _id = `${key}|${window}`;
      try {
        // Never below zero: give back what is there, in one conditional update each.
        const res = await coll.updateOne({ _id, c: { $gte: cost } }, { $inc: { c: -cost } });
        if (res.matchedCount === 0) await coll.updateOne({ _id, c: { $gt: 0, $lt: cost } }, { $set: { c: 0 } });
      } catch (err) {
        backendError("mongodb", err);
      }
    },
  };
}
