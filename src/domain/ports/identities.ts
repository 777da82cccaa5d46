import type { IdentityPatch, IdentityRecord } from "../types.js";

/** A page request over records sorted by id (ids sort by creation time). */
export interface PageQuery {
  limit: number;
  /** Return records with an id greater than this. */
  afterId: string | null;
}

/**
 * Where identities are kept. Errors (every port): a duplicate external_id or
 * key hash throws AlreadyExistsError; an unreachable database throws
 * UnavailableError. Each method is atomic on its own.
 */
export interface IdentityRepository {
  createIdentity(rec: IdentityRecord): Promise<void>;
  /**
   * Returns the identity with `rec.externalId`, creating it from `rec` when
   * absent. Safe under concurrent calls: exactly one identity results.
   */
  ensureIdentity(rec: IdentityRecord): Promise<{ identity: IdentityRecord; created: boolean }>;
  getIdentity(id: string): Promise<IdentityRecord | null>;
  getIdentityByExternalId(externalId: string): Promise<IdentityRecord | null>;
  getIdentities(ids: string[]): Promise<IdentityRecord[]>;
  listIdentities(page: PageQuery, search: string | null): Promise<IdentityRecord[]>;
  /** Applies `patch`; returns the updated identity, or null when it does not exist. */
  updateIdentity(id: string, patch: IdentityPatch, now: number): Promise<IdentityRecord | null>;
  /** Deletes the identity and either deletes or unlinks its keys; null when it does not exist. */
  deleteIdentity(id: string, deleteKeys: boolean): Promise<{ deletedKeys: number; unlinkedKeys: number } | null>;
}
