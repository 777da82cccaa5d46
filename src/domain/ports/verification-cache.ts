import type { IdentityRecord, KeyRecord } from "../types.js";

/**
 * The reads VerifyKey makes: keys by hash (null: no such key) and identities by
 * id, answered from a cache kept fresh by the change feed or from the store
 * (src/cache/verification-cache.ts).
 */
export interface VerificationCache {
  getKeyByHash(hash: string): Promise<KeyRecord | null>;
  getIdentity(id: string): Promise<IdentityRecord | null>;
  /**
   * What the cache can answer at once, without a promise (counted as a hit), or
   * undefined when it cannot (then the get above reads it): the hot path of a
   * cached verification does not wait for a microtask per read.
   */
  cachedKey(hash: string): KeyRecord | null | undefined;
  cachedIdentity(id: string): IdentityRecord | null | undefined;
}
