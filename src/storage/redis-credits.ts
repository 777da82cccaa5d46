import { performance } from "node:perf_hooks";
import type { Redis } from "ioredis";
import type { RefillDue } from "../domain/credits.js";
import { FailedPreconditionError, StoreUnreachableError, UnavailableError } from "../domain/errors.js";
import type {
  Credits,
  CreditsOp,
  CreditsTarget,
  IdentityPatch,
  IdentityRecord,
  KeyPatch,
  KeyRecord,
  RootKeyRecord,
} from "../domain/types.js";
import type { Logger } from "../observability/logger.js";
import type { UsageQuery, UsageRow } from "../domain/usage.js";
import type { MongoStore } from "./mongodb/mongo-store.js";
import type { Change, CommitSignal, KeyFilter, PageQuery, SpendResult, Store, StoreCapabilities } from "./store.js";

/** How long close() keeps trying to write this instance's balances back. */
const CLOSE_FLUSH_MS = 10_000;

/*
 * Credit balances held in Redis, in front of the MongoDB store: the "redis"
 * credits backend (LATCHKEY_CREDITS_BACKEND). See docs/credits.md.
 *
 * While a balance is loaded in Redis, Redis holds it: a spend is one Lua script
 * (refill if due, then spend if it fits — the rule of domain/credits.ts, kept in
 * step by the shared store tests), atomic in Redis, so every instance draws from
 * one balance without a lock. Every change increments the balance's sequence
 * number `n` and marks it dirty; every instance writes dirty balances back to
 * MongoDB every LATCHKEY_CREDITS_FLUSH_MS, conditionally on `n` (never going
 * back), and unmarks a balance only if it did not change meanwhile. Updates
 * (UpdateCredits, credits set by UpdateKey/UpdateIdentity, rerolls) go through
 * Redis too and are written through to MongoDB before they are acknowledged.
 *
 * A balance not in Redis is loaded from MongoDB by the first call that needs
 * it (an insert-if-absent: concurrent loaders agree). Keys are never given a
 * TTL; Redis must not evict them (noeviction or a volatile-* policy).
 *
 * What a crash costs: a Latchkey instance killed at any point loses nothing —
 * the balance lives in Redis, and any instance writes it back — but the unused
 * part of its credit leases (at most leaseMax per balance; see spendBatch()). Redis losing its
 * data (restart without persistence) reloads balances from MongoDB as last
 * written back: the spends of at most one flush interval are forgotten and may
 * be spent again (with appendfsync everysec: of about a second).
 */

/**
 * Spends from one balance, in order, each cost if it still fits (what that many
 * SPEND calls back to back would do, in one atomic step). State fields of a
 * balance in Redis: r remaining, u unlimited, lr last refill, to moved-to key
 * id, n sequence; and for credit leases (docs/credits.md, "Credit leases") le
 * the lease epoch (a return must name it; SET and MOVE change it), lc leases
 * out, lx when the last of them expires (Redis's clock, ms), fz no grants
 * before (an update waiting for leases). ARGV: prefix, refill period start
 * ('' for none), refill amount, now, the costs joined by commas, the lease
 * asked for (0: none), its lifetime (ms), and the lease this instance gives
 * back with the batch: its epoch ('' for none), its refill time, its unused
 * credits (with no costs and no lease asked for: a lease given back alone).
 * Returns {'b', lr, r, oks, lease, le} — r the balance before the first of
 * these spends (after a refill and the lease given back), oks one '1'
 * or '0' per spend (spent or not; each spent one's cost comes off r in turn),
 * lease the credits granted after the spends (0: none; only when at most 1/1,024
 * of what is left and at least 8) — or {'unl'}, {'miss', member}, {'gone'}.
 * (One argument and one reply string for a batch, not two array elements a
 * spend: what ioredis and Redis parse and write per spend.)
 */
const SPEND = `
local key = KEYS[1]
for hop = 0, 8 do
  local st = redis.call('hmget', key, 'r', 'u', 'lr', 'to', 'n', 'le', 'lc', 'lx', 'fz')
  if not st[5] then return {'miss', string.sub(key, string.len(ARGV[1]) + 1)} end
  if st[4] then
    key = ARGV[1] .. 'k:' .. st[4]
  elseif st[2] then
    return {'unl'}
  else
    local r = tonumber(st[1])
    local lr = st[3] or ''
    local changed = false
    if ARGV[2] ~= '' and st[3] and tonumber(st[3]) < tonumber(ARGV[2]) then
      r = tonumber(ARGV[3])
      lr = ARGV[2]
      redis.call('hset', key, 'lr', lr)
      changed = true
    end
    local le = st[6] or '0'
    local lc = tonumber(st[7] or '0')
    if ARGV[8] ~= '' and ARGV[8] == le then
      if lc > 0 then
        lc = lc - 1
        redis.call('hset', key, 'lc', lc)
      end
      local unused = tonumber(ARGV[10])
      if unused > 0 and ARGV[9] == lr then
        r = r + unused
        changed = true
      end
    end
    local before = r
    local oks = {}
    for c in string.gmatch(ARGV[5], '[^,]+') do
      local cost = tonumber(c)
      if r >= cost then
        if cost > 0 then
          r = r - cost
          changed = true
        end
        oks[#oks + 1] = '1'
      else
        oks[#oks + 1] = '0'
      end
    end
    local lease = 0
    if tonumber(ARGV[6]) > 0 then
      local t = redis.call('time')
      local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      if not st[9] or tonumber(st[9]) <= now then
        lease = math.min(tonumber(ARGV[6]), math.floor(r / 1024))
        if lease >= 8 then
          r = r - lease
          changed = true
          redis.call('hset', key, 'lc', lc + 1)
          local x = now + tonumber(ARGV[7])
          if not st[8] or tonumber(st[8]) < x then redis.call('hset', key, 'lx', x) end
        else
          lease = 0
        end
      end
    end
    local out = {'b', lr, before, table.concat(oks), lease, le}
    if changed then
      redis.call('hset', key, 'r', r)
      redis.call('hincrby', key, 'n', 1)
      redis.call('zadd', KEYS[2], 'NX', ARGV[4], string.sub(key, string.len(ARGV[1]) + 1))
    end
    return out
  end
end
return {'gone'}
`;

/**
 * Gives back a spend (see Store.returnCredits): follows moves; adds ARGV[2] to
 * a limited balance whose refill time is still ARGV[3] ('' for none).
 */
const RETURN = `
local key = KEYS[1]
for hop = 0, 8 do
  local st = redis.call('hmget', key, 'r', 'u', 'lr', 'to', 'n')
  if not st[5] then return 0 end
  if st[4] then
    key = ARGV[1] .. 'k:' .. st[4]
  elseif st[2] or not st[1] or (st[3] or '') ~= ARGV[3] then
    return 0
  else
    redis.call('hincrby', key, 'r', ARGV[2])
    redis.call('hincrby', key, 'n', 1)
    redis.call('zadd', KEYS[2], 'NX', ARGV[4], string.sub(key, string.len(ARGV[1]) + 1))
    return 1
  end
end
return 0
`;

/** Loads a balance if absent. ARGV: n, then field/value pairs. */
const LOAD = `
if redis.call('exists', KEYS[1]) == 1 then return 0 end
redis.call('hset', KEYS[1], 'n', ARGV[1])
for i = 2, #ARGV, 2 do redis.call('hset', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
`;

/** Reads a balance, following moves: {'r', r, lr|false, n, member} | {'u', n, member} | {'miss', member} | {'gone'}. */
const READ = `
local key = KEYS[1]
for hop = 0, 8 do
  local st = redis.call('hmget', key, 'r', 'u', 'lr', 'to', 'n')
  local member = string.sub(key, string.len(ARGV[1]) + 1)
  if not st[5] then return {'miss', member} end
  if st[4] then
    key = ARGV[1] .. 'k:' .. st[4]
  elseif st[2] then
    return {'u', st[5], member}
  else
    return {'r', st[1], st[3] or '', st[5], member}
  end
end
return {'gone'}
`;

/**
 * Lua for an update of the balance at `key` (KEYS[1]): while leases are out (`lc`) and
 * the last of them (expiring at `lx`, Redis's clock) has not expired by `grace`
 * ms, it stops further grants for a while (fz) and returns {-2, ms to wait}
 * instead of going on.
 */
const leasesOutLua = (lc: string, lx: string, grace: string, key = "KEYS[1]") => `
if tonumber(${lc} or '0') > 0 then
  local t = redis.call('time')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local wait = tonumber(${lx} or '0') + tonumber(${grace}) - now
  if wait > 0 then
    redis.call('hset', ${key}, 'fz', now + wait + 5000)
    return {-2, wait}
  end
end`;

/**
 * UpdateCredits, in one step: follows moves, applies a due refill (as SPEND
 * does), then the operation — ARGV[3] 'set' (to ARGV[4]), 'unl' (unlimited),
 * 'inc' or 'dec' (by ARGV[4], a decrement stopping at zero) — the rule of
 * domain/credits.ts applyCreditsOp, kept in step by the shared store tests.
 * A set or a decrement first waits for the leases out (an increment cannot
 * admit more than the balance) and moves the lease epoch on. ARGV: prefix,
 * now, op, value, refill period start ('' for none), refill amount, the
 * leases' grace (ms). Returns {'ok', n, member, r ('' when unlimited), lr},
 * {-2, ms to wait}, {'unl'} (inc/dec of an unlimited balance), {'miss',
 * member} or {'gone'}. (It was a read, the rule in JavaScript and a
 * compare-and-set on n: on a balance spent from all the time, n always moved
 * in between, and the update failed.)
 */
const UPDATE = `
local key = KEYS[1]
for hop = 0, 8 do
  local st = redis.call('hmget', key, 'r', 'u', 'lr', 'to', 'n', 'lc', 'lx')
  local member = string.sub(key, string.len(ARGV[1]) + 1)
  if not st[5] then return {'miss', member} end
  if st[4] then
    key = ARGV[1] .. 'k:' .. st[4]
  else
    local op = ARGV[3]
    if st[2] and (op == 'inc' or op == 'dec') then return {'unl'} end
    if op ~= 'inc' then
${leasesOutLua("st[6]", "st[7]", "ARGV[7]", "key")}
      redis.call('hdel', key, 'lc', 'lx', 'fz')
      redis.call('hincrby', key, 'le', 1)
    end
    local r = tonumber(st[1] or '0')
    local lr = st[3]
    if not st[2] and ARGV[5] ~= '' and st[3] and tonumber(st[3]) < tonumber(ARGV[5]) then
      r = tonumber(ARGV[6])
      lr = ARGV[5]
    end
    local n = tonumber(st[5]) + 1
    local out = ''
    if op == 'unl' then
      redis.call('hdel', key, 'r', 'lr')
      redis.call('hset', key, 'u', '1')
    else
      if op == 'set' then
        r = tonumber(ARGV[4])
      elseif op == 'inc' then
        r = math.min(r + tonumber(ARGV[4]), 9007199254740991)
      else
        r = math.max(0, r - tonumber(ARGV[4]))
      end
      redis.call('hdel', key, 'u')
      redis.call('hset', key, 'r', r)
      if lr then redis.call('hset', key, 'lr', lr) end
      out = string.format('%.0f', r)
    end
    redis.call('hset', key, 'n', n)
    redis.call('zadd', KEYS[2], 'NX', ARGV[2], member)
    return {'ok', n, member, out, lr or ''}
  end
end
return {'gone'}
`;

/**
 * Sets a balance (after a write that set a record's credits in MongoDB):
 * replaces r/u/lr with the pairs from ARGV[4], drops any move, increments n
 * and the lease epoch and marks it dirty: returns {n}. ARGV: now, member, the
 * leases' grace (ms), pairs. While leases are out and the last of them has
 * not expired by the grace (Redis's clock), nothing is set: no more leases are
 * granted for a while (fz) and it returns {-2, ms to wait}.
 */
const SET = `
local st = redis.call('hmget', KEYS[1], 'n', 'lc', 'lx')
${leasesOutLua("st[2]", "st[3]", "ARGV[3]")}
redis.call('hdel', KEYS[1], 'r', 'u', 'lr', 'to', 'lc', 'lx', 'fz')
redis.call('hincrby', KEYS[1], 'le', 1)
for i = 4, #ARGV, 2 do redis.call('hset', KEYS[1], ARGV[i], ARGV[i + 1]) end
local n = tonumber(st[1] or '0') + 1
redis.call('hset', KEYS[1], 'n', n)
redis.call('zadd', KEYS[2], 'NX', ARGV[1], ARGV[2])
return {n}
`;

/**
 * A reroll: the old key's balance moves to the new key, and the old key points
 * at it; both get the next lease epoch. KEYS: old, new, dirty. ARGV: new key
 * id, now, old member, new member, the leases' grace (ms). Nothing when the old
 * balance is not loaded (MongoDB already holds the move): 0. Waits for leases
 * out as SET does: {-2, ms to wait}.
 */
const MOVE = `
local st = redis.call('hmget', KEYS[1], 'r', 'u', 'lr', 'to', 'n', 'le', 'lc', 'lx')
if not st[5] then return 0 end
${leasesOutLua("st[7]", "st[8]", "ARGV[5]")}
local n = tonumber(st[5]) + 1
local le = tonumber(st[6] or '0') + 1
redis.call('del', KEYS[2])
if st[4] then
  redis.call('hset', KEYS[2], 'to', st[4], 'n', n, 'le', le)
  return 1
end
if st[2] then redis.call('hset', KEYS[2], 'u', '1') else redis.call('hset', KEYS[2], 'r', st[1]) end
if st[3] then redis.call('hset', KEYS[2], 'lr', st[3]) end
redis.call('hset', KEYS[2], 'n', n, 'le', le)
redis.call('hdel', KEYS[1], 'r', 'u', 'lr', 'lc', 'lx', 'fz')
redis.call('hset', KEYS[1], 'to', ARGV[1], 'n', n, 'le', le)
redis.call('zadd', KEYS[3], 'NX', ARGV[2], ARGV[3])
redis.call('zadd', KEYS[3], 'NX', ARGV[2], ARGV[4])
return 1
`;

/** Unmarks a dirty balance if its n is still ARGV[2] (or it is gone). */
const CLEAN = `
local n = redis.call('hget', KEYS[2], 'n')
if not n or n == ARGV[2] then return redis.call('zrem', KEYS[1], ARGV[1]) end
return 0
`;

type LedgerRedis = Redis & {
  lkCreditsSpend(key: string, dirty: string, ...args: (string | number)[]): Promise<(string | number)[]>;
  lkCreditsSpendNow(key: string, dirty: string, ...args: (string | number)[]): Promise<(string | number)[]>;
  lkCreditsReturn(key: string, dirty: string, prefix: string, cost: number, refilledAt: string, now: number): Promise<number>;
  lkCreditsLoad(key: string, n: number, ...pairs: (string | number)[]): Promise<number>;
  lkCreditsRead(key: string, prefix: string): Promise<string[]>;
  lkCreditsSet(key: string, dirty: string, now: number, member: string, graceMs: number, ...pairs: (string | number)[]): Promise<number[]>;
  lkCreditsUpdate(key: string, dirty: string, prefix: string, now: number, op: string, value: number, periodStart: string, amount: number, graceMs: number): Promise<(string | number)[]>;
  lkCreditsMove(oldKey: string, newKey: string, dirty: string, newId: string, now: number, oldMember: string, newMember: string, graceMs: number): Promise<number | number[]>;
  lkCreditsClean(dirty: string, state: string, member: string, n: string): Promise<number>;
};

export interface RedisCreditsOptions {
  /** How often dirty balances are written back to MongoDB. */
  flushMs: number;
  logger?: Logger;
  /** Closes the Redis client on close() (when this store created it). */
  ownsClient?: boolean;
  /**
   * Most credits of a balance this instance takes ahead in one round trip and
   * spends itself (a lease; docs/credits.md, "Credit leases"). 0 (the default
   * here; the server's is LATCHKEY_CREDITS_LEASE_MAX): none.
   */
  leaseMax?: number;
  /** How long this instance spends from a lease, from before it asked for it (ms). */
  leaseMs?: number;
  /** A lease not spent from for this long goes back before its lifetime ends (ms). */
  leaseIdleMs?: number;
}

/**
 * The spend script under the name a lone batch sends it by, which the server's
 * Redis client keeps out of auto-pipelining (createRedisClient; see spendBatch()).
 */
export const SPEND_NOW = "lkCreditsSpendNow";

/** Most spends one script takes (more wait for the next): a script holds Redis while it runs. */
const SPEND_BATCH_MAX = 500;

/** How long an instance spends from a credit lease, unless told otherwise (ms). */
export const CREDIT_LEASE_MS = 250;
/**
 * A lease nothing was spent from for this long goes back at once, not at the
 * end of its lifetime (ms): once a load stops, reads of the balance (which
 * count other instances' leases as spent) are exact again this soon after,
 * and an update waiting for the leases out goes through.
 */
export const CREDIT_LEASE_IDLE_MS = 25;
/**
 * How long past a lease's expiry in Redis an update waits for the holder to
 * give back what it did not spend before counting it spent (ms): the holder
 * stops spending at its own expiry, measured from before it asked, and gives
 * the rest back at once.
 */
const LEASE_GRACE_MS = 100;
/** How often an update waiting for leases asks again whether they are back (ms). */
const LEASE_POLL_MS = 20;
/** How long an update waits for leases at most before answering UNAVAILABLE (ms). */
const LEASE_WAIT_MAX_MS = 10_000;
const DAY_MS = 86_400_000;

/**
 * A block of a balance granted to this instance by the spend script, which
 * spends from it without a round trip until it is used up or expires, then
 * gives back the rest (docs/credits.md, "Credit leases").
 */
interface Lease {
  member: string;
  /** Credits left in it, and spent from it (what sizes the next one). */
  left: number;
  used: number;
  /**
   * performance.now() from which it is not spent from: its lifetime counted
   * from before it was asked for (so before Redis counts it), and never past
   * the next UTC midnight (every refill period starts at one).
   */
  until: number;
  /** The balance's lease epoch and refill time at the grant: what a return names. */
  epoch: string;
  lr: string;
  /** The balance in Redis after the grant: a spend from the lease answers base + left. */
  base: number;
  refilledAt: number | null;
  /** performance.now() of the grant or of the last spend from it (an idle lease goes back early). */
  lastAt: number;
  timer: NodeJS.Timeout | null;
}

/** The lease asked for with a batch: none for a lone spend, else sized to what this instance spends. */
function leaseAsk(max: number, batch: QueuedSpend[], prev: Lease | undefined): number {
  if (max === 0 || (batch.length < 2 && prev === undefined)) return 0;
  let cost = 0;
  for (const q of batch) cost += q.cost;
  return Math.min(max, prev === undefined ? 8 * cost : 2 * (prev.used + cost));
}

/** ms from `now` to the next UTC midnight. */
export function msToUtcMidnight(now: number): number {
  return DAY_MS - (now % DAY_MS);
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** A spend waiting for the one in flight on its balance (spendCredits). */
interface QueuedSpend {
  cost: number;
  signal: CommitSignal | undefined;
  resolve: (r: SpendResult) => void;
  reject: (err: unknown) => void;
}

const memberOf = (t: CreditsTarget) => ("keyId" in t ? `k:${t.keyId}` : `i:${t.identityId}`);
const targetOf = (member: string): CreditsTarget => (member.startsWith("k:") ? { keyId: member.slice(2) } : { identityId: member.slice(2) });
/** Field/value pairs for a balance. */
const pairsOf = (c: Credits | null): (string | number)[] => (c === null ? ["u", 1] : ["r", c.remaining, ...(c.refill ? ["lr", c.refill.lastRefillAt] : [])]);

/**
 * The MongoDB store with its credit balances held in Redis (see the comment at
 * the top of this file). Everything else is the MongoDB store's.
 */
export class RedisCreditsStore implements Store {
  readonly kind = "mongodb" as const;
  get capabilities(): StoreCapabilities {
    return this.inner.capabilities;
  }
  private readonly redis: LedgerRedis;
  private prefix = "";
  private dirty = "";
  private timer: NodeJS.Timeout | null = null;
  /** The write-back pass in flight, and the one queued behind it (see flush()). */
  private flushing: Promise<void> | null = null;
  private queued: Promise<void> | null = null;
  /** Per balance (and refill due) with a spend in flight from this instance: the spends waiting for it. */
  private readonly spending = new Map<string, QueuedSpend[]>();
  /** Per balance (and refill due): the lease this instance spends from. */
  private readonly leases = new Map<string, Lease>();
  private readonly leaseMax: number;
  private readonly leaseMs: number;
  private readonly leaseIdleMs: number;

  constructor(
    readonly inner: MongoStore,
    redis: Redis,
    private readonly opts: RedisCreditsOptions,
  ) {
    this.redis = redis as LedgerRedis;
    this.leaseMax = opts.leaseMax ?? 0;
    this.leaseMs = opts.leaseMs ?? CREDIT_LEASE_MS;
    this.leaseIdleMs = opts.leaseIdleMs ?? CREDIT_LEASE_IDLE_MS;
    this.redis.defineCommand("lkCreditsSpend", { numberOfKeys: 2, lua: SPEND });
    this.redis.defineCommand(SPEND_NOW, { numberOfKeys: 2, lua: SPEND });
    this.redis.defineCommand("lkCreditsLoad", { numberOfKeys: 1, lua: LOAD });
    this.redis.defineCommand("lkCreditsReturn", { numberOfKeys: 2, lua: RETURN });
    this.redis.defineCommand("lkCreditsRead", { numberOfKeys: 1, lua: READ });
    this.redis.defineCommand("lkCreditsSet", { numberOfKeys: 2, lua: SET });
    this.redis.defineCommand("lkCreditsUpdate", { numberOfKeys: 2, lua: UPDATE });
    this.redis.defineCommand("lkCreditsMove", { numberOfKeys: 3, lua: MOVE });
    this.redis.defineCommand("lkCreditsClean", { numberOfKeys: 2, lua: CLEAN });
  }

  private key(member: string): string {
    return this.prefix + member;
  }

  /** Runs a Redis call, turning a failure into UNAVAILABLE. */
  private async r<T>(fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      if (err instanceof UnavailableError || err instanceof FailedPreconditionError) throw err;
      throw new UnavailableError(`credits (redis): ${(err as Error).message}`);
    }
  }

  async init(): Promise<void> {
    await this.inner.init();
    // One namespace per database: deployments (and tests) may share a Redis.
    this.prefix = `lk:${this.inner.database}:cr:`;
    this.dirty = `${this.prefix}dirty`;
    this.timer = setInterval(() => void this.flush().catch((err: Error) => this.opts.logger?.warn({ err: err.message }, "credits write-back failed; retrying")), this.opts.flushMs);
    this.timer.unref();
  }

  async ping(): Promise<void> {
    await this.inner.ping();
    await this.r(() => this.redis.ping());
  }

  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    // What is left of this instance's leases goes back first (else it is lost until an update).
    await Promise.all([...this.leases.keys()].map((group) => this.endLease(group)));
    // Any instance writes balances back; writing this one's share now is a courtesy. The
    // calls are drained by now, so a pass started after this point (flush() waits for one
    // in flight first) writes every spend this instance made.
    // A pass can fail for a passing reason (a dead instance's lock taken over late on
    // a loaded store): try again for a few seconds before leaving the balances to
    // the next instance (they stay in Redis, marked dirty: nothing is lost). Not
    // while the store cannot be reached: that is an outage, not worth the wait.
    const until = performance.now() + CLOSE_FLUSH_MS;
    for (;;) {
      try {
        await this.flush();
        break;
      } catch (err) {
        if (err instanceof StoreUnreachableError || performance.now() >= until) {
          this.opts.logger?.warn({ err: (err as Error).message }, "credits write-back at close failed; they stay in Redis and another instance will write them");
          break;
        }
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    if (this.opts.ownsClient) await this.redis.quit().catch(() => this.redis.disconnect());
    await this.inner.close();
  }

  /** Loads a balance from MongoDB into Redis if it is not there; false when its document does not exist. */
  private async load(member: string): Promise<boolean> {
    const d = await this.inner.readCreditsHolder(targetOf(member));
    if (!d) return false;
    // A fresh lease epoch: a lease granted before Redis lost the balance is not given back into it.
    const pairs = [...(d.creditsKeyId ? ["to", d.creditsKeyId] : pairsOf(d.credits)), "le", Date.now()];
    await this.r(() => this.redis.lkCreditsLoad(this.key(member), d.seq, ...pairs));
    return true;
  }

  /**
   * Spends from a balance. Spends of the same balance (and the same refill
   * due) made in one turn of the event loop go out together at its end
   * (setImmediate), and while such a batch is in flight from this instance the
   * next ones queue and go out together when it returns: one script for all of
   * them, each spent in order if it fits — as exact as one script each, at a
   * round trip per batch instead of per call (docs/credits.md, "One hot balance"). A queued spend's
   * call that ended before its batch went out spends nothing (the commit point
   * is when the script is sent). With a lease of this balance that covers the
   * cost and has not expired, the spend is taken from it, without a round trip
   * (docs/credits.md, "Credit leases").
   */
  spendCredits(target: CreditsTarget, cost: number, refill: RefillDue | null, signal?: CommitSignal): Promise<SpendResult> {
    const member = memberOf(target);
    const group = refill ? `${member}|${refill.periodStart}|${refill.amount}` : member;
    const lease = this.leases.get(group);
    const now = lease === undefined ? 0 : performance.now();
    if (lease !== undefined && lease.left >= cost && now < lease.until) {
      // From this instance's lease, without a round trip: the commit point is here.
      try {
        signal?.throwIfAborted();
      } catch (err) {
        return Promise.reject(err);
      }
      return Promise.resolve(this.fromLease(lease, cost, now));
    }
    return new Promise<SpendResult>((resolve, reject) => {
      const spend: QueuedSpend = { cost, signal, resolve, reject };
      const queue = this.spending.get(group);
      if (queue) {
        queue.push(spend);
        return;
      }
      const batch = [spend];
      this.spending.set(group, batch);
      // What is left in `batch` past SPEND_BATCH_MAX waits, in the map, for the next script.
      setImmediate(() => void this.spendBatch(group, member, refill, batch.splice(0, SPEND_BATCH_MAX)));
    });
  }

  private fromLease(lease: Lease, cost: number, now: number): SpendResult {
    lease.left -= cost;
    lease.used += cost;
    lease.lastAt = now;
    return { ok: true, remaining: lease.base + lease.left, refilledAt: lease.refilledAt };
  }

  /**
   * One script spending the costs of `batch` in order from the balance of
   * `member` (loading it first if it is not in Redis), giving back what is left
   * of this instance's lease on it and asking for the next; then the spends
   * that queued meanwhile — from that lease as far as it goes, the rest as the
   * next batch.
   */
  private async spendBatch(group: string, member: string, refill: RefillDue | null, batch: QueuedSpend[]): Promise<void> {
    const settle = (r: SpendResult) => batch.forEach((q) => q.resolve(r));
    // The lease this instance holds on the balance goes back with the batch.
    let prev = this.leases.get(group);
    if (prev !== undefined) this.dropLease(group, prev);
    let giving: Lease | undefined;
    try {
      for (let tries = 0; ; tries++) {
        // The commit point: the script is the write. A call that has ended spends nothing.
        batch = batch.filter((q) => {
          try {
            q.signal?.throwIfAborted();
            return true;
          } catch (err) {
            q.reject(err);
            return false;
          }
        });
        if (batch.length === 0) {
          if (prev !== undefined) await this.returnLease(prev);
          break;
        }
        if (tries >= 10) throw new UnavailableError("credits (redis): the balance could not be loaded; retry");
        let costs = String(batch[0]!.cost);
        for (let i = 1; i < batch.length; i++) costs += "," + batch[i]!.cost;
        const ask = leaseAsk(this.leaseMax, batch, prev);
        // The only balance this instance is spending from (one hot customer) sends its
        // script as a plain command, written at once: auto-pipelining would hold it for
        // another turn of the event loop and build a pipeline of one. Several balances'
        // scripts go out auto-pipelined, in one write (docs/credits.md, "One hot balance").
        const spend = this.spending.size === 1 ? this.redis.lkCreditsSpendNow : this.redis.lkCreditsSpend;
        const sentAt = performance.now();
        const lifetime = Math.min(this.leaseMs, msToUtcMidnight(Date.now()));
        giving = prev;
        prev = undefined; // given back by this script, or lost with the balance if Redis no longer holds it
        const res = await this.r(() =>
          spend.call(
            this.redis,
            this.key(member),
            this.dirty,
            this.prefix,
            refill ? String(refill.periodStart) : "",
            refill?.amount ?? 0,
            Date.now(),
            costs,
            ask,
            this.leaseMs,
            giving?.epoch ?? "",
            giving?.lr ?? "",
            giving?.left ?? 0,
          ),
        );
        giving = undefined;
        const status = res[0];
        if (status === "b") {
          const refilledAt = res[1] === "" ? null : Number(res[1]);
          // The balance after each spend, as the script took them: in order, each spent one's cost off.
          let remaining = Number(res[2]);
          const oks = String(res[3]);
          for (let i = 0; i < batch.length; i++) {
            const q = batch[i]!;
            const ok = oks.charCodeAt(i) === 49; // "1"
            if (ok) remaining -= q.cost;
            q.resolve({ ok, remaining, refilledAt });
          }
          const granted = Number(res[4]);
          if (granted > 0) {
            const lease: Lease = { member, left: granted, used: 0, until: sentAt + lifetime, epoch: String(res[5]), lr: String(res[1]), base: remaining - granted, refilledAt, lastAt: performance.now(), timer: null };
            this.leases.set(group, lease);
            this.armLease(group, lease);
          }
          break;
        }
        if (status === "unl") {
          settle({ ok: true, remaining: null });
          break;
        }
        if (status === "gone") {
          settle({ ok: false, remaining: 0 });
          break;
        }
        const missing = String(res[1]);
        if (!(await this.load(missing))) {
          settle(missing === member ? { ok: true, remaining: null } : { ok: false, remaining: 0 });
          break;
        }
      }
    } catch (err) {
      for (const q of batch) q.reject(err);
      if (giving !== undefined || prev !== undefined) this.logLeaseLost(err);
    }
    const queued = this.spending.get(group)!;
    const lease = this.leases.get(group);
    if (lease !== undefined) {
      // In order, from the lease as far as it goes (a call that has ended spends nothing).
      let served = 0;
      const now = performance.now();
      for (const q of queued) {
        if (q.signal?.aborted) {
          q.reject(q.signal.reason);
        } else if (lease.left >= q.cost && now < lease.until) {
          q.resolve(this.fromLease(lease, q.cost, now));
        } else {
          break;
        }
        served++;
      }
      queued.splice(0, served);
    }
    if (queued.length === 0) {
      this.spending.delete(group);
      return;
    }
    void this.spendBatch(group, member, refill, queued.splice(0, SPEND_BATCH_MAX));
  }

  /**
   * Sets a lease's timer for the first moment it may end: its lifetime, or
   * `leaseIdleMs` after the last spend from it. When the timer fires early and
   * the lease was spent from meanwhile, it is set again (at most one timer a
   * lease at a time, and none per spend).
   */
  private armLease(group: string, lease: Lease): void {
    const check = () => {
      lease.timer = null;
      if (this.leases.get(group) !== lease) return;
      const now = performance.now();
      if (now >= lease.until || now - lease.lastAt >= this.leaseIdleMs) return void this.endLease(group, lease);
      this.armLease(group, lease);
    };
    lease.timer = setTimeout(check, Math.max(0, Math.min(lease.until, lease.lastAt + this.leaseIdleMs) - performance.now()));
    lease.timer.unref();
  }

  /** Takes a lease out of use (its timer stopped); what is left of it goes back with the caller's script. */
  private dropLease(group: string, lease: Lease): void {
    if (this.leases.get(group) === lease) this.leases.delete(group);
    if (lease.timer) clearTimeout(lease.timer);
    lease.timer = null;
  }

  /** Ends this instance's lease on a balance (expired, or the store closing): what is left goes back. */
  private async endLease(group: string, lease = this.leases.get(group)): Promise<void> {
    if (lease === undefined || this.leases.get(group) !== lease) return;
    this.dropLease(group, lease);
    try {
      await this.returnLease(lease);
    } catch (err) {
      this.logLeaseLost(err);
    }
  }

  /**
   * Gives back what is left of a lease on its own: the spend script with no
   * spends and no lease asked for (a batch's script gives back the same way).
   * 1 when credits were added (the epoch and refill time still the lease's).
   */
  private async returnLease(lease: Lease): Promise<number> {
    const res = await this.r(() =>
      this.redis.lkCreditsSpend(this.key(lease.member), this.dirty, this.prefix, "", 0, Date.now(), "", 0, this.leaseMs, lease.epoch, lease.lr, lease.left),
    );
    return res[0] === "b" && String(res[5]) === lease.epoch && String(res[1]) === lease.lr && lease.left > 0 ? 1 : 0;
  }

  /**
   * Runs an update script until it is applied: one that finds leases out (and
   * not yet expired) answers {-2, ms}, and has stopped further grants; this
   * waits for their holders to give them back or for them to expire.
   */
  private async untilLeasesBack<T>(run: () => Promise<T>): Promise<T> {
    const until = performance.now() + LEASE_WAIT_MAX_MS;
    for (;;) {
      const res = await this.r(run);
      if (!Array.isArray(res) || res[0] !== -2) return res;
      if (performance.now() >= until) throw new UnavailableError("credits (redis): leases of this balance are still out; retry");
      await sleep(Math.min(LEASE_POLL_MS, Number(res[1]) + 1));
    }
  }

  private logLeaseLost(err: unknown): void {
    this.opts.logger?.warn({ err: (err as Error).message }, "credits (redis): what was left of a lease could not be given back; it stays spent");
  }

  async returnCredits(target: CreditsTarget, cost: number, refilledAt: number | null): Promise<boolean> {
    const given = await this.r(() =>
      this.redis.lkCreditsReturn(this.key(memberOf(target)), this.dirty, this.prefix, cost, refilledAt === null ? "" : String(refilledAt), Date.now()),
    );
    return given === 1;
  }

  async updateCredits(target: CreditsTarget, op: CreditsOp, now: number, refill: RefillDue | null): Promise<Credits | null | undefined> {
    const member = memberOf(target);
    const [name, value] = op.op === "set" ? (op.value === null ? ["unl", 0] : ["set", op.value]) : [op.op === "increment" ? "inc" : "dec", op.value];
    // The rule, applied by the script in one step (a set or a decrement waits for leases out).
    let res: (string | number)[];
    for (let tries = 0; ; tries++) {
      if (tries >= 10) throw new UnavailableError("credits (redis): the balance could not be loaded; retry");
      res = await this.untilLeasesBack(() =>
        this.redis.lkCreditsUpdate(this.key(member), this.dirty, this.prefix, Date.now(), name, value, refill ? String(refill.periodStart) : "", refill?.amount ?? 0, LEASE_GRACE_MS),
      );
      if (res[0] !== "miss") break;
      if (!(await this.load(String(res[1])))) {
        if (res[1] === member) return undefined;
        throw new FailedPreconditionError("this key's balance moved to a key that was deleted");
      }
    }
    if (res[0] === "gone") throw new FailedPreconditionError("this key's balance moved to a key that was deleted");
    if (res[0] === "unl") throw new FailedPreconditionError("credits are unlimited; SET a balance first");
    const [, n, holderMember, remaining, lr] = res as [string, number, string, string, string];
    const holder = targetOf(holderMember);
    const rule = (await this.inner.readCreditsHolder(holder))?.credits?.refill ?? null;
    const next: Credits | null = name === "unl" ? null : { remaining: Number(remaining), refill: rule && { ...rule, lastRefillAt: lr === "" ? rule.lastRefillAt : Number(lr) } };
    // Written through before it is acknowledged (the write-back would get there too).
    await this.inner.persistCredits(holder, { remaining: next?.remaining ?? null, lastRefillAt: next?.refill?.lastRefillAt }, Number(n), {
      updatedAt: now,
      recordChange: true,
    });
    return next;
  }

  /** After a write that set a record's credits in MongoDB: Redis takes the new balance. */
  private async replace(member: string, credits: Credits | null): Promise<void> {
    await this.untilLeasesBack(() => this.redis.lkCreditsSet(this.key(member), this.dirty, Date.now(), member, LEASE_GRACE_MS, ...pairsOf(credits)));
  }

  /** Records as stored, with the balances Redis holds. */
  private async overlay<T extends { credits: Credits | null }>(records: T[], memberFor: (r: T) => string | null): Promise<T[]> {
    const wanted = records.map((rec) => (rec.credits !== null || ("creditsKeyId" in rec && rec.creditsKeyId) ? memberFor(rec) : null));
    if (wanted.every((m) => m === null)) return records;
    // Defined commands work in pipelines too (ioredis loads the script when Redis lacks it).
    const pipeline = this.redis.pipeline() as unknown as { lkCreditsRead(key: string, prefix: string): void; exec(): Promise<[Error | null, unknown][] | null> };
    for (const m of wanted) if (m !== null) pipeline.lkCreditsRead(this.key(m), this.prefix);
    const results = await this.r(async () => (await pipeline.exec()) ?? []);
    let i = 0;
    return records.map((rec, j) => {
      if (wanted[j] === null) return rec;
      const [err, res] = results[i++] as [Error | null, string[]];
      if (err || !res || res[0] === "miss" || res[0] === "gone") return rec;
      if (res[0] === "u") return { ...rec, credits: null };
      const refill = rec.credits?.refill ?? null;
      return { ...rec, credits: { remaining: Number(res[1]), refill: refill && { ...refill, lastRefillAt: res[2] === "" ? refill.lastRefillAt : Number(res[2]) } } };
    });
  }

  private keyMember = (k: KeyRecord) => `k:${k.creditsKeyId ?? k.id}`;
  private identityMember = (i: IdentityRecord) => `i:${i.id}`;

  private async keys(list: KeyRecord[]): Promise<KeyRecord[]> {
    return this.overlay(list, this.keyMember);
  }
  private async key1(k: KeyRecord | null): Promise<KeyRecord | null> {
    return k ? (await this.keys([k]))[0] : null;
  }
  private async identities(list: IdentityRecord[]): Promise<IdentityRecord[]> {
    return this.overlay(list, this.identityMember);
  }
  private async identity1(i: IdentityRecord | null): Promise<IdentityRecord | null> {
    return i ? (await this.identities([i]))[0] : null;
  }

  /**
   * Writes back every balance that is dirty when it is called (any instance's);
   * one pass at a time. A pass in flight may have read a balance before the
   * spends this caller wants written (it reads, then waits for the lock — for a
   * killed instance's lease, up to 1.5 s — then writes what it read), so joining
   * it is not enough: the caller gets the pass queued behind it, one shared by
   * every caller that comes while it waits.
   */
  flush(): Promise<void> {
    if (this.queued) return this.queued;
    if (!this.flushing) return this.pass();
    this.queued = this.flushing
      .catch(() => undefined)
      .then(() => {
        this.queued = null;
        return this.pass();
      });
    return this.queued;
  }

  private pass(): Promise<void> {
    const p: Promise<void> = this.flushOnce().finally(() => {
      if (this.flushing === p) this.flushing = null;
    });
    this.flushing = p;
    return p;
  }

  private async flushOnce(): Promise<void> {
    for (;;) {
      const members = await this.r(() => this.redis.zrangebyscore(this.dirty, "-inf", "+inf", "LIMIT", 0, 200));
      if (members.length === 0) return;
      for (let i = 0; i < members.length; i += 16) {
        await Promise.all(members.slice(i, i + 16).map((m) => this.writeBack(m)));
      }
      if (members.length < 200) return;
    }
  }

  private async writeBack(member: string): Promise<void> {
    const [u, r, lr, to, n] = await this.r(() => this.redis.hmget(this.key(member), "u", "r", "lr", "to", "n"));
    if (n !== null && !to) {
      const res = await this.inner.persistCredits(targetOf(member), { remaining: u ? null : Number(r), lastRefillAt: lr === null ? undefined : Number(lr) }, Number(n));
      if (res === "missing") await this.r(() => this.redis.del(this.key(member)));
    }
    await this.r(() => this.redis.lkCreditsClean(this.dirty, this.key(member), member, n ?? ""));
  }

  /** Balances waiting to be written back (all instances'), for tests and metrics. */
  async pendingWriteBacks(): Promise<number> {
    return this.r(() => this.redis.zcard(this.dirty));
  }

  // --- the MongoDB store, with balances from Redis ------------------------------------------

  createIdentity(rec: IdentityRecord): Promise<void> {
    return this.inner.createIdentity(rec);
  }
  async ensureIdentity(rec: IdentityRecord): Promise<{ identity: IdentityRecord; created: boolean }> {
    const res = await this.inner.ensureIdentity(rec);
    return { ...res, identity: (await this.identity1(res.identity))! };
  }
  async getIdentity(id: string): Promise<IdentityRecord | null> {
    return this.identity1(await this.inner.getIdentity(id));
  }
  async getIdentityByExternalId(externalId: string): Promise<IdentityRecord | null> {
    return this.identity1(await this.inner.getIdentityByExternalId(externalId));
  }
  async getIdentities(ids: string[]): Promise<IdentityRecord[]> {
    return this.identities(await this.inner.getIdentities(ids));
  }
  async listIdentities(page: PageQuery, search: string | null): Promise<IdentityRecord[]> {
    return this.identities(await this.inner.listIdentities(page, search));
  }
  async updateIdentity(id: string, patch: IdentityPatch, now: number): Promise<IdentityRecord | null> {
    const rec = await this.inner.updateIdentity(id, patch, now);
    if (rec && patch.credits !== undefined) await this.replace(`i:${id}`, patch.credits);
    return this.identity1(rec);
  }
  async deleteIdentity(id: string, deleteKeys: boolean): Promise<{ deletedKeys: number; unlinkedKeys: number } | null> {
    // The keys deleted with it take their balances with them.
    const members = [`i:${id}`];
    for (let afterId: string | null = null; deleteKeys; ) {
      const page = await this.inner.listKeys({ identityId: id }, { limit: 100, afterId });
      members.push(...page.map((k) => `k:${k.id}`));
      if (page.length < 100) break;
      afterId = page[page.length - 1].id;
    }
    const res = await this.inner.deleteIdentity(id, deleteKeys);
    if (res) await this.r(() => this.redis.del(...members.map((m) => this.key(m))));
    return res;
  }
  createKey(rec: KeyRecord): Promise<void> {
    return this.inner.createKey(rec);
  }
  async getKey(id: string): Promise<KeyRecord | null> {
    return this.key1(await this.inner.getKey(id));
  }
  async getKeyByHash(hash: string): Promise<KeyRecord | null> {
    return this.key1(await this.inner.getKeyByHash(hash));
  }
  async listKeys(filter: KeyFilter, page: PageQuery): Promise<KeyRecord[]> {
    return this.keys(await this.inner.listKeys(filter, page));
  }
  async updateKey(id: string, patch: KeyPatch, now: number): Promise<KeyRecord | null> {
    const rec = await this.inner.updateKey(id, patch, now);
    if (rec && patch.credits !== undefined) await this.replace(`k:${id}`, patch.credits);
    return this.key1(rec);
  }
  async deleteKey(id: string): Promise<boolean> {
    const deleted = await this.inner.deleteKey(id);
    if (deleted) await this.r(() => this.redis.del(this.key(`k:${id}`)));
    return deleted;
  }
  async rerollKey(oldId: string, next: KeyRecord, oldExpiresAt: number, now: number): Promise<KeyRecord | null> {
    const stored = await this.inner.rerollKey(oldId, next, oldExpiresAt, now);
    if (!stored) return null;
    // MongoDB holds the move; Redis moves the live balance (spent meanwhile or not).
    await this.untilLeasesBack(() =>
      this.redis.lkCreditsMove(this.key(`k:${oldId}`), this.key(`k:${next.id}`), this.dirty, next.id, Date.now(), `k:${oldId}`, `k:${next.id}`, LEASE_GRACE_MS),
    );
    return this.key1(stored);
  }
  changesSince(afterSeq: number, limit: number, opts?: { pastGaps?: boolean }): Promise<Change[]> {
    return this.inner.changesSince(afterSeq, limit, opts);
  }
  changeFeedStart(): Promise<number> {
    return this.inner.changeFeedStart();
  }
  lastChangeSeq(): Promise<number> {
    return this.inner.lastChangeSeq();
  }
  pruneChanges(beforeSeq: number): Promise<void> {
    return this.inner.pruneChanges(beforeSeq);
  }
  writeUsage(rows: UsageRow[], batch: { writer: string; seq: number }): Promise<void> {
    return this.inner.writeUsage(rows, batch);
  }
  queryUsage(q: UsageQuery): Promise<UsageRow[]> {
    return this.inner.queryUsage(q);
  }
  touchLastUsed(times: Map<string, number>): Promise<void> {
    return this.inner.touchLastUsed(times);
  }
  pruneUsage(granularity: "minute" | "hour" | "day", before: number): Promise<void> {
    return this.inner.pruneUsage(granularity, before);
  }
  createRootKey(rec: RootKeyRecord): Promise<void> {
    return this.inner.createRootKey(rec);
  }
  getRootKeyByHash(hash: string): Promise<RootKeyRecord | null> {
    return this.inner.getRootKeyByHash(hash);
  }
  listRootKeys(): Promise<RootKeyRecord[]> {
    return this.inner.listRootKeys();
  }
  deleteRootKey(id: string): Promise<boolean> {
    return this.inner.deleteRootKey(id);
  }
  createFirstRootKey(rec: RootKeyRecord): Promise<boolean> {
    return this.inner.createFirstRootKey(rec);
  }
}
