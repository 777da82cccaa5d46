import type { MongoClient } from "mongodb";
import type { ChangeFeed } from "../domain/ports/change-feed.js";
import type { CreditLedger } from "../domain/ports/credit-ledger.js";
import type { IdentityRepository } from "../domain/ports/identities.js";
import type { KeyRepository } from "../domain/ports/keys.js";
import type { RootKeyRepository } from "../domain/ports/root-keys.js";
import type { StoreProbe } from "../domain/ports/store-probe.js";
import type { UsageStore } from "../domain/ports/usage-store.js";

export type { Change, ChangeFeed, ChangeTargets } from "../domain/ports/change-feed.js";
export type { CommitSignal, CreditLedger, SpendResult } from "../domain/ports/credit-ledger.js";
export { abortSignalOf } from "../domain/ports/credit-ledger.js";
export type { IdentityRepository, PageQuery } from "../domain/ports/identities.js";
export type { KeyFilter, KeyRepository } from "../domain/ports/keys.js";
export type { RootKeyRepository } from "../domain/ports/root-keys.js";
export type { UsageStore } from "../domain/ports/usage-store.js";
export type { RefillDue } from "../domain/credits.js";

/**
 * What a backend can do beyond the ports, for the composition root to choose
 * the other adapters by (the rate-limit counter is picked with
 * them) instead of testing for a class.
 */
export interface StoreCapabilities {
  /** Several server instances share this store (so rate-limit pools must be counted where all of them count). */
  readonly shared: boolean;
  /**
   * The server applies a conditional update ($inc under a filter) atomically.
   * False on FerretDB, which applies it as a read and a write (known once the
   * store is initialised).
   */
  readonly atomicUpdates: boolean;
  /** A MongoDB client a shared rate-limit counter may count in (one connection pool per deployment). */
  readonly counterClient?: MongoClient;
}

/**
 * What a storage backend implements: every port the domain declares for
 * persistence (src/domain/ports/), plus its lifecycle. Each method is atomic on
 * its own: it either applies completely or not at all, and read-modify-write
 * happens inside the store (a transaction or a single conditional update),
 * never in the caller.
 *
 * Errors: a duplicate external_id, key hash, root key hash or record id throws
 * AlreadyExistsError; an unreachable database throws UnavailableError.
 */
export interface Store extends IdentityRepository, KeyRepository, CreditLedger, ChangeFeed, UsageStore, RootKeyRepository, StoreProbe {
  readonly kind: "embedded" | "mongodb";
  readonly capabilities: StoreCapabilities;

  /** Creates tables / collections and indexes. Called once at start. */
  init(): Promise<void>;
  close(): Promise<void>;
}
