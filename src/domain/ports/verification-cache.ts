import type { IdentityRecord, KeyRecord } from "../types.js";

/**
 * The reads VerifyKey makes: keys by hash (null: no such key) and identities by
 * id, answered from a cache kept fresh by the change feed or from the store
 * (src/cache/verification-cache.ts).
 */
export interface VerificationCache {
  getKeyByHash(hash: string): Promise<KeyRecord | null>;
  getIdentity(id: string): Promise<IdentityRecord | null>;
}
