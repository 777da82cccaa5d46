import { performance } from "node:perf_hooks";
import { StoreUnreachableError } from "../domain/errors.js";
import type { IdentityRecord, KeyRecord } from "../domain/types.js";
import { fastSeries, type Metrics } from "../observability/metrics.js";
import type { IdentityRepository } from "../domain/ports/identities.js";
import type { KeyRepository } from "../domain/ports/keys.js";
import { LruCache } from "./lru.js";

export interface CacheOptions {
  /** Most keys (and as many identities) held. */
  maxEntries: number;
  /** How long an entry is trusted without a change event (the safety net if one is lost). */
  ttlMs: number;
  /**
   * While the store cannot be reached: how old (since the change feed or the
   * store last vouched for it) an entry may be and still answer. 0: never.
   */
  outageMs?: number;
}

/** How the change feed steers the cache (set by src/cache/invalidation.ts). */
export interface CachePolicy {
  /** Whether cached entries may answer (false while the feed is behind, under read-through). */
  useCached(): boolean;
  /** Whether store reads may be cached (false for a while after changes may have been missed). */
  keepFills(): boolean;
  /** The feed's clock, in ms; fills are timed on it. */
  clock(): number;
  /** When (on `clock`) the feed was last read to its end: every change written before then has reached the cache. */
  lastComplete(): number;
}

/** How long a store read may have been in flight for a lookup that must not use the cache to share it. */
const SHARE_READ_MS = 1000;

type Versioned = { version?: number };

/** A store read of one entry; an eviction of that entry marks it stale, so its result is not cached. */
interface Fill<T> {
  promise: Promise<T | null>;
  started: number;
  stale: boolean;
}

interface Table<T extends Versioned> {
  name: "key" | "identity";
  lru: LruCache<string, T | null>;
  pending: Map<string, Fill<T>>;
  /** Entries with a write in flight (an open intent in the change feed), with how many. */
  pinned: Map<string, number>;
  fetch: (id: string) => Promise<T | null>;
}

/**
 * Read-through cache of keys (by hash, including "no such key") and identities
 * (by id) for VerifyKey. Entries are evicted by the change feed
 * (invalidation.ts) on every instance, and expire after `ttlMs` at the latest.
 * Concurrent misses for one entry share one store read.
 *
 * It cannot go back in time (docs/revocation.md):
 * - an eviction discards the store read of *that* entry in flight (its callers
 *   get the answer, the cache does not keep it), and nothing else;
 * - a fill never replaces a record of a higher `version`, and a patch applies
 *   only to the very version its caller read;
 * - an entry with a write in flight (`pin`) is read from the store and never
 *   cached until the write is known to have landed;
 * - while `useCached()` is false (the change feed is behind), lookups read
 *   through to the store, and while `keepFills()` is false (after changes may
 *   have been missed) what they read is not cached either.
 *
 * While the store cannot be reached (a read fails with StoreUnreachableError),
 * a cached entry still answers if the store or the change feed vouched for it
 * within `outageMs` (fallBack); otherwise the read's UNAVAILABLE stands.
 */
export function createVerificationCache(deps: {
  store: Pick<KeyRepository, "getKeyByHash"> & Pick<IdentityRepository, "getIdentity">;
  options: CacheOptions;
  metrics?: Metrics;
  now?: () => number;
  /** Whether the store is reachable (its guard's view): while it is not, a usable cached entry answers without trying it. */
  reachable?: () => boolean;
}) {
  const reachable = deps.reachable ?? (() => true);
  const { store, options, metrics } = deps;
  const now = deps.now ?? Date.now;
  const outageMs = options.outageMs ?? 0;
  // Without a change feed nothing vouches for an entry after it was read.
  let policy: CachePolicy = { useCached: () => true, keepFills: () => true, clock: () => performance.now(), lastComplete: () => -Infinity };

  function table<T extends Versioned>(name: "key" | "identity", fetch: (id: string) => Promise<T | null>): Table<T> {
    return { name, lru: new LruCache<string, T | null>(options.maxEntries), pending: new Map(), pinned: new Map(), fetch };
  }
  const keys = table<KeyRecord>("key", (h) => store.getKeyByHash(h));
  const identities = table<IdentityRecord>("identity", (i) => store.getIdentity(i));

  const counters = (name: string) =>
    metrics && {
      hit: fastSeries(metrics.cacheLookups, { cache: name, result: "hit" }),
      miss: fastSeries(metrics.cacheLookups, { cache: name, result: "miss" }),
      bypass: fastSeries(metrics.cacheLookups, { cache: name, result: "bypass" }),
    };
  const counted = { key: counters("key"), identity: counters("identity") };
  const staleAnswers = { key: metrics?.cacheStaleAnswers.labels({ cache: "key" }), identity: metrics?.cacheStaleAnswers.labels({ cache: "identity" }) };

  /** Caches `v` (read from the store at `readAt` on the feed's clock) unless the entry already holds a newer record. */
  function setNewer<T extends Versioned>(t: Table<T>, id: string, v: T | null, expires: number, readAt: number): void {
    const cur = t.lru.peek(id, now())?.value;
    if (cur && v && (cur.version ?? 0) > (v.version ?? 0)) return;
    t.lru.set(id, v, expires, readAt);
  }

  /**
   * The store could not be reached for `id`: the cached entry answers if it is
   * recent enough — expired by the TTL or not, since the TTL only guards against
   * a lost change event — counted from the later of its store read and the last
   * complete read of the change feed (which would have evicted it had it
   * changed before then). Never an entry with a write in flight (pinned).
   */
  function fallBack<T extends Versioned>(t: Table<T>, id: string, err: unknown): T | null {
    if (!(err instanceof StoreUnreachableError)) throw err;
    const e = outageEntry(t, id);
    if (!e) throw err;
    return e.value;
  }

  /** The cached entry that may answer while the store cannot be reached (counted), if there is one. */
  function outageEntry<T extends Versioned>(t: Table<T>, id: string): { value: T | null } | undefined {
    if (outageMs <= 0 || t.pinned.has(id)) return undefined;
    const e = t.lru.stale(id);
    if (!e || policy.clock() - Math.max(e.at, policy.lastComplete()) > outageMs) return undefined;
    staleAnswers[t.name]?.inc();
    return e;
  }

  /**
   * The entry, when the cache may answer for it now (counted as a hit);
   * undefined otherwise, and nothing counted: `load` then reads it. Lets a
   * cached verification go on without waiting for a promise.
   */
  function cached<T extends Versioned>(t: Table<T>, id: string): T | null | undefined {
    if (t.pinned.has(id) || !policy.useCached()) return undefined;
    const at = now();
    const e = t.lru.get(id, at);
    if (!e) return undefined;
    counted[t.name]?.hit.inc();
    metrics?.hitWindow.record(t.name, true, at);
    return e.value;
  }

  function load<T extends Versioned>(t: Table<T>, id: string): Promise<T | null> {
    const at = now();
    const c = counted[t.name];
    const usable = !t.pinned.has(id) && policy.useCached();
    if (usable) {
      const e = t.lru.get(id, at);
      if (e) {
        c?.hit.inc();
        metrics?.hitWindow.record(t.name, true, at);
        return Promise.resolve(e.value);
      }
      c?.miss.inc();
    } else {
      c?.bypass.inc();
    }
    metrics?.hitWindow.record(t.name, false, at);
    if (!reachable()) {
      // Known unreachable: no store call (and no wait for it) when the cache can answer.
      const e = outageEntry(t, id);
      if (e) return Promise.resolve(e.value);
    }
    return readThrough(t, id, at, usable).catch((err: unknown) => fallBack(t, id, err));
  }

  /** Reads the entry from the store (joining a read in flight) and caches what it read. */
  function readThrough<T extends Versioned>(t: Table<T>, id: string, at: number, usable: boolean): Promise<T | null> {
    const shared = t.pending.get(id);
    if (shared && (usable || at - shared.started < SHARE_READ_MS)) return shared.promise;
    const fill: Fill<T> = { promise: null as unknown as Promise<T | null>, started: at, stale: false };
    const readAt = policy.clock();
    fill.promise = t.fetch(id).then(
      (v) => {
        if (t.pending.get(id) === fill) t.pending.delete(id);
        if (!fill.stale && !t.pinned.has(id) && policy.keepFills()) setNewer(t, id, v, at + options.ttlMs, readAt);
        return v;
      },
      (err) => {
        if (t.pending.get(id) === fill) t.pending.delete(id);
        throw err;
      },
    );
    t.pending.set(id, fill);
    return fill.promise;
  }

  function evict<T extends Versioned>(t: Table<T>, id: string): void {
    t.lru.delete(id);
    const fill = t.pending.get(id);
    if (fill) {
      fill.stale = true;
      t.pending.delete(id);
    }
  }

  function pin<T extends Versioned>(t: Table<T>, id: string): void {
    t.pinned.set(id, (t.pinned.get(id) ?? 0) + 1);
    evict(t, id);
  }

  function unpin<T extends Versioned>(t: Table<T>, id: string): void {
    const n = t.pinned.get(id) ?? 0;
    if (n <= 1) t.pinned.delete(id);
    else t.pinned.set(id, n - 1);
    evict(t, id);
  }

  /** Replaces a cached record with `rec` only while the entry holds the very version `rec` was read at. */
  function patch<T extends Versioned & { id: string }>(t: Table<T>, id: string, rec: T): void {
    if (t.pinned.has(id)) return;
    const cur = t.lru.peek(id, now())?.value;
    if (cur && cur.id === rec.id && (cur.version ?? 0) === (rec.version ?? 0)) t.lru.replace(id, rec);
  }

  function clear<T extends Versioned>(t: Table<T>): void {
    t.lru.clear();
    for (const fill of t.pending.values()) fill.stale = true;
    t.pending.clear();
  }

  return {
    getKeyByHash: (hash: string) => load(keys, hash),
    getIdentity: (id: string) => load(identities, id),
    /** The cached key (null: cached as unknown) when the cache may answer now; undefined: use getKeyByHash. */
    cachedKey: (hash: string) => cached(keys, hash),
    /** The cached identity (null: cached as unknown) when the cache may answer now; undefined: use getIdentity. */
    cachedIdentity: (id: string) => cached(identities, id),
    evictKey: (hash: string) => evict(keys, hash),
    evictIdentity: (id: string) => evict(identities, id),
    /** A write of this key is in flight: read it from the store, never cache it, until unpinned. */
    pinKey: (hash: string) => pin(keys, hash),
    unpinKey: (hash: string) => unpin(keys, hash),
    pinIdentity: (id: string) => pin(identities, id),
    unpinIdentity: (id: string) => unpin(identities, id),
    /** Forgets every entry and every store read in flight (pins stay). */
    clear() {
      clear(keys);
      clear(identities);
    },
    /** Set by the change feed: when cached entries may be used, when store reads may be cached, and how current they are. */
    setPolicy(p: CachePolicy) {
      policy = p;
    },
    /**
     * Refreshes the cached record after a write this instance knows the result
     * of (a credit spend, which keeps the version): applies only while the
     * entry still holds the version `rec` was read at, and keeps its expiry.
     */
    patchKey: (hash: string, rec: KeyRecord) => patch(keys, hash, rec),
    patchIdentity: (rec: IdentityRecord) => patch(identities, rec.id, rec),
    stats: () => ({ keys: keys.lru.size, identities: identities.lru.size, pinned: keys.pinned.size + identities.pinned.size }),
  };
}

export type VerificationCache = ReturnType<typeof createVerificationCache>;
