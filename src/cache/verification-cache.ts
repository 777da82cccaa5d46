import type { IdentityRecord, KeyRecord } from "../domain/types.js";
import type { Metrics } from "../server/metrics.js";
import type { Store } from "../storage/store.js";
import { LruCache } from "./lru.js";

export interface CacheOptions {
  /** Most keys (and as many identities) held. */
  maxEntries: number;
  /** How long an entry is trusted without a change event (the safety net if one is lost). */
  ttlMs: number;
}

/**
 * Read-through cache of keys (by hash, including "no such key") and identities
 * (by id) for VerifyKey. Entries are evicted by the change feed
 * (invalidation.ts) on every instance, and expire after `ttlMs` at the latest.
 * Concurrent misses for one entry share one store read.
 */
export function createVerificationCache(deps: { store: Store; options: CacheOptions; metrics?: Metrics; now?: () => number }) {
  const { store, options } = deps;
  const now = deps.now ?? Date.now;
  const keys = new LruCache<string, KeyRecord | null>(options.maxEntries);
  const identities = new LruCache<string, IdentityRecord | null>(options.maxEntries);
  const pendingKeys = new Map<string, Promise<KeyRecord | null>>();
  const pendingIdentities = new Map<string, Promise<IdentityRecord | null>>();
  // Bumped by every eviction, so a read that raced an eviction is not cached.
  let generation = 0;
  const hit = deps.metrics?.cacheLookups;

  async function load<T>(
    cache: LruCache<string, T | null>,
    pending: Map<string, Promise<T | null>>,
    id: string,
    fetch: (id: string) => Promise<T | null>,
    name: string,
  ): Promise<T | null> {
    const t = now();
    const e = cache.get(id, t);
    if (e) {
      hit?.inc({ cache: name, result: "hit" });
      return e.value;
    }
    hit?.inc({ cache: name, result: "miss" });
    let p = pending.get(id);
    if (!p) {
      const gen = generation;
      p = fetch(id).then(
        (v) => {
          pending.delete(id);
          if (gen === generation) cache.set(id, v, t + options.ttlMs);
          return v;
        },
        (err) => {
          pending.delete(id);
          throw err;
        },
      );
      pending.set(id, p);
    }
    return p;
  }

  return {
    getKeyByHash: (hash: string) => load(keys, pendingKeys, hash, (h) => store.getKeyByHash(h), "key"),
    getIdentity: (id: string) => load(identities, pendingIdentities, id, (i) => store.getIdentity(i), "identity"),
    evictKey(hash: string) {
      generation++;
      keys.delete(hash);
      pendingKeys.delete(hash);
    },
    evictIdentity(id: string) {
      generation++;
      identities.delete(id);
      pendingIdentities.delete(id);
    },
    clear() {
      generation++;
      keys.clear();
      identities.clear();
    },
    /** Refresh a cached record after a local write we know the result of (refill time). */
    patchKey(hash: string, rec: KeyRecord) {
      const e = keys.get(hash, now());
      if (e && e.value?.id === rec.id) keys.set(hash, rec, now() + options.ttlMs);
    },
    patchIdentity(rec: IdentityRecord) {
      const e = identities.get(rec.id, now());
      if (e && e.value) identities.set(rec.id, rec, now() + options.ttlMs);
    },
    stats: () => ({ keys: keys.size, identities: identities.size }),
  };
}

export type VerificationCache = ReturnType<typeof createVerificationCache>;
