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

/** A lease takes at most this share of what its window has left (1/64)… */
const LEASE_SHARE = 64;
/** …and only when that is at least this many tokens: near the limit, or for a small limit, every call goes to Redis. */
const LEASE_MIN = 8;
/** Most pools with a lease held at once by one process (past it, new pools take per call). */
const MAX_LEASES = 100_000;

/**
 * Tokens of one window of one pool that this process took in Redis ahead of
 * its calls and hands out itself (docs/credits.md, "Rate-limit leases"). Redis
 * counts them as taken, so however many processes lease, no window admits more
 * than its limit.
 */
interface Lease {
  window: number;
  limit: number;
  durationMs: number;
  /** Leased tokens not handed out yet. */
  left: number;
  /** The window's count in Redis after this process's last round trip for it (what it leased included). */
  total: number;
  /** Whether that round trip leased: if not, the pool is near its limit and refunds go back to Redis. */
  active: boolean;
  /**
   * A round trip that leases, in flight: other takes on the pool wait for it
   * instead of leasing too. It settles to the error it failed with, if it did:
   * the takes that waited fail with it too, rather than each trying again in
   * turn against a backend that just failed.
   */
  pending: Promise<unknown> | null;
}

/**
 * Counts in Redis, shared by every instance. Windows follow Redis's clock: the
 * offset of this process's clock to Redis `TIME` is measured at start and every
 * minute, so all instances agree on window boundaries to within a round trip.
 *
 * With `leaseMax` > 0 a take that goes to Redis also takes up to that many
 * tokens ahead (at most 1/64 of what the window has left, and only when that
 * is at least 8), which the next takes on the pool in the same window use
 * without a round trip; refunds go back to the lease. `returnLeases` gives
 * what is left back to Redis (a graceful stop).
 */
export function createRedisCounter(
  client: Redis,
  opts: { now?: () => number; leaseMax?: number } = {},
): RateLimitCounter & { syncClock(): Promise<void>; stop(): void; returnLeases(): Promise<void> } {
  const localNow = opts.now ?? Date.now;
  const leaseMax = opts.leaseMax ?? 0;
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
  // rate-limiter-flexible defines its script command on the client when its first
  // limiter is made; an auto-pipeline already open in that turn of the event loop
  // (this clock sync, a credit spend) lacks it, and the take failed ("pipeline[functionName]
  // is not a function"). So one limiter is made now, before any command is sent.
  limiterFor(1);
  let timer: NodeJS.Timeout | null = null;
  if (!opts.now) {
    syncClock().catch(() => undefined);
    timer = setInterval(() => void syncClock().catch(() => undefined), 60_000);
    timer.unref();
  }
  const now = () => localNow() + offset;

  /** Adds `points` to window `k` if they fit under `limit`: the window's count after it, or (refused) as it is. */
  async function redisTake(k: string, points: number, limit: number, window: number, durationMs: number, t: number): Promise<{ ok: boolean; total: number }> {
    try {
      const res = await limiterFor(limit).consume(k, points, { customDuration: keepSeconds(window, durationMs, t) });
      return { ok: true, total: res.consumedPoints };
    } catch (err) {
      // A RateLimiterRes is the script's refusal: nothing was added.
      if (err instanceof RateLimiterRes) return { ok: false, total: err.consumedPoints - points };
      return backendError("redis", err);
    }
  }
  async function redisRefund(key: string, cost: number, durationMs: number, window: number): Promise<void> {
    try {
      await limiterFor(1).reward(`${key}:${window}`, cost, { customDuration: keepSeconds(window, durationMs, now()) });
    } catch (err) {
      backendError("redis", err);
    }
  }

  const leases = new Map<string, Lease>();
  let made = 0;
  /** Tokens a lease may take ahead when the window would be at `after` without them (0: none). */
  const leaseSize = (limit: number, after: number) => {
    const n = Math.min(leaseMax, Math.floor((limit - after) / LEASE_SHARE));
    return n >= LEASE_MIN ? n : 0;
  };
  /** What a lease still holds of a window not yet over, given back to Redis (nothing to give: undefined). */
  function giveBack(key: string, l: Lease): Promise<void> | undefined {
    const left = l.left;
    l.left = 0;
    return left > 0 && windowOf(now(), l.durationMs) === l.window ? redisRefund(key, left, l.durationMs, l.window) : undefined;
  }
  /** Forgets a lease, giving back what it holds. */
  function drop(key: string, l: Lease): void {
    if (leases.get(key) === l) leases.delete(key);
    void giveBack(key, l)?.catch(() => undefined);
  }
  /** The pool's lease if it is for this window, limit and duration; another one is void, and dropped. */
  function leaseFor(key: string, window: number, limit: number, durationMs: number): Lease | undefined {
    const l = leases.get(key);
    if (!l || (l.window === window && l.limit === limit && l.durationMs === durationMs)) return l;
    drop(key, l);
    return undefined;
  }
  /** Leases of windows that are over hold nothing anyone can use. */
  function sweep(): void {
    const t = now();
    for (const [key, l] of leases) if (!l.pending && windowOf(t, l.durationMs) !== l.window) leases.delete(key);
  }

  /** A take that goes to Redis, leasing ahead when the window has room (one such round trip per pool at a time). */
  async function takeInRedis(key: string, cost: number, limit: number, durationMs: number, window: number, t: number): Promise<{ ok: boolean; total: number }> {
    const k = `${key}:${window}`;
    let l = leases.get(key);
    const held = l?.left ?? 0; // fewer than cost: used by this call if Redis admits the rest
    const need = cost - held;
    let extra = leaseSize(limit, (l?.total ?? 0) + need);
    if (!l && extra > 0 && leases.size < MAX_LEASES) {
      if (++made % 1024 === 0) sweep();
      l = { window, limit, durationMs, left: 0, total: 0, active: false, pending: null };
      leases.set(key, l);
    }
    if (!l) return redisTake(k, cost, limit, window, durationMs, t);
    const lease = l;
    lease.left -= held; // reserved for this call until Redis answers
    const run = async () => {
      try {
        let r = await redisTake(k, need + extra, limit, window, durationMs, t);
        if (!r.ok && extra > 0) {
          // Other processes took most of the window: no lease, just this call.
          extra = 0;
          r = await redisTake(k, need, limit, window, durationMs, t);
        }
        lease.total = r.total;
        lease.active = extra > 0;
        if (!r.ok) {
          lease.left += held;
          return { ok: false, total: r.total - lease.left };
        }
        lease.left += extra;
        if (leases.get(key) !== lease) drop(key, lease); // replaced meanwhile (a changed limit): the lease goes back
        return { ok: true, total: r.total - lease.left };
      } catch (err) {
        lease.left += held;
        throw err;
      }
    };
    if (extra === 0) return run();
    const p = run();
    const settled = p.then(
      () => undefined,
      (err: unknown) => err,
    );
    lease.pending = settled;
    try {
      return await p;
    } finally {
      if (lease.pending === settled) lease.pending = null;
    }
  }

  return {
    kind: "redis",
    syncClock,
    stop: () => {
      if (timer) clearInterval(timer);
    },
    async returnLeases() {
      const held = [...leases];
      leases.clear();
      await Promise.all(held.map(([key, l]) => giveBack(key, l)));
    },
    async take(key, cost, limit, durationMs) {
      const t = now();
      const window = windowOf(t, durationMs);
      const resetAt = (window + 1) * durationMs;
      // A lease of another window, or from before the pool's limit or duration changed, is void.
      let l = leaseFor(key, window, limit, durationMs);
      if (cost === 0) {
        try {
          const total = ((await limiterFor(limit).get(`${key}:${window}`))?.consumedPoints ?? 0) - (l?.left ?? 0);
          return { ok: total < limit, total, window, resetAt };
        } catch (err) {
          return backendError("redis", err);
        }
      }
      while (l) {
        if (l.left >= cost) {
          l.left -= cost;
          return { ok: true, total: l.total - l.left, window, resetAt };
        }
        if (!l.pending) break;
        const failed = await l.pending;
        if (failed !== undefined) throw failed;
        l = leaseFor(key, window, limit, durationMs);
      }
      const r = await takeInRedis(key, cost, limit, durationMs, window, t);
      return { ok: r.ok, total: r.total, window, resetAt };
    },
    async refund(key, cost, durationMs, window) {
      if (cost <= 0) return;
      const l = leases.get(key);
      if (l && l.active && l.window === window && l.durationMs === durationMs && windowOf(now(), durationMs) === window) {
        // Still counted in Redis as this process's: it goes back to the lease.
        l.left += cost;
        return;
      }
      await redisRefund(key, cost, durationMs, window);
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
