import type { RootKeyRecord } from "../types.js";

/** Where root keys (the API's own credentials) are kept. */
export interface RootKeyRepository {
  createRootKey(rec: RootKeyRecord): Promise<void>;
  getRootKeyByHash(hash: string): Promise<RootKeyRecord | null>;
  listRootKeys(): Promise<RootKeyRecord[]>;
  deleteRootKey(id: string): Promise<boolean>;
  /**
   * Creates `rec` only when no root key exists yet (the bootstrap key of a
   * fresh install). Returns true when it was created.
   */
  createFirstRootKey(rec: RootKeyRecord): Promise<boolean>;
}
