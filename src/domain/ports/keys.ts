import type { KeyPatch, KeyRecord } from "../types.js";
import type { PageQuery } from "./identities.js";

export interface KeyFilter {
  apiId?: string;
  identityId?: string;
}

/** Where keys are kept (by id and by hash). */
export interface KeyRepository {
  createKey(rec: KeyRecord): Promise<void>;
  getKey(id: string): Promise<KeyRecord | null>;
  getKeyByHash(hash: string): Promise<KeyRecord | null>;
  listKeys(filter: KeyFilter, page: PageQuery): Promise<KeyRecord[]>;
  updateKey(id: string, patch: KeyPatch, now: number): Promise<KeyRecord | null>;
  deleteKey(id: string): Promise<boolean>;
  /**
   * Stores `next` and sets the old key's expiry to `oldExpiresAt`, both or
   * neither. The old key's own balance moves to `next` as it is at that moment
   * (the old key then spends from it: `creditsKeyId`); a key that already spends
   * from another's passes that on. Returns the stored `next`, or null when the
   * old key does not exist.
   */
  rerollKey(oldId: string, next: KeyRecord, oldExpiresAt: number, now: number): Promise<KeyRecord | null>;
}
