import type { RefillDue } from "../domain/credits.js";
import type { UsageQuery, UsageRow } from "../usage/types.js";
import type {
  CreditsOp,
  CreditsTarget,
  Credits,
  IdentityPatch,
  IdentityRecord,
  KeyPatch,
  KeyRecord,
  RootKeyRecord,
} from "../domain/types.js";

/** The keys (cached by hash) and identities (cached by id) one write touches. */
export interface ChangeTargets {
  keys: { id: string; hash: string }[];
  identities: string[];
}

/**
 * One entry of the change feed, for cache invalidation across instances
 * (src/cache/invalidation.ts, docs/revocation.md). Seqs increase by one with no
 * gap: seq N is only ever written once N-1 exists, so a reader that finds N+1
 * missing has read everything written before it looked.
 *
 * - `write`: written in the same transaction as the write it describes.
 * - `intent`: written *before* the write it announces (stores without
 *   multi-document transactions). That write lands within `boundMs` of this
 *   record becoming visible, or never; until then, or until the matching
 *   `done`, the targets must not be cached.
 * - `done`: the write announced by the intent `intent` has landed (or failed).
 */
export type Change = ChangeTargets & { seq: number } & (
    | { phase: "write" }
    | { phase: "intent"; boundMs: number }
    | { phase: "done"; intent: number }
  );

export type { RefillDue } from "../domain/credits.js";

/**
 * A spend's outcome. For a limited balance, `refilledAt` is its refill time
 * after the spend (null without a refill rule): what `returnCredits` checks.
 */
export type SpendResult = { ok: boolean; remaining: number; refilledAt?: number | null } | { ok: true; remaining: null };

/** A page request over records sorted by id (ids sort by creation time). */
export interface PageQuery {
  limit: number;
  /** Return records with an id greater than this. */
  afterId: string | null;
}

export interface KeyFilter {
  apiId?: string;
  identityId?: string;
}

/**
 * The one storage port. Each method is atomic on its own: it either applies
 * completely or not at all, and read-modify-write happens inside the store
 * (a transaction or a single conditional update), never in the caller.
 *
 * Errors: a duplicate external_id, key hash, root key hash or record id throws
 * AlreadyExistsError; an unreachable database throws UnavailableError.
 */
export interface Store {
  readonly kind: "embedded" | "mongodb";

  /** Creates tables / collections and indexes. Called once at start. */
  init(): Promise<void>;
  /** Resolves when the store answers; throws UnavailableError otherwise. */
  ping(): Promise<void>;
  close(): Promise<void>;

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
  /**
   * Atomically changes a balance: `refill` (when the domain found one due) is
   * applied first if the stored balance was not refilled for that period yet,
   * then `op` (domain/credits.ts applyCreditsOp). Returns the new credits
   * (null = unlimited) or undefined when the target does not exist.
   */
  updateCredits(target: CreditsTarget, op: CreditsOp, now: number, refill: RefillDue | null): Promise<Credits | null | undefined>;

  /**
   * Spends `cost` credits from the target's balance if it holds that many, all
   * or nothing. With `refill`, a balance last refilled before
   * `refill.periodStart` is first set to `refill.amount` — a compare-and-set on
   * the refill time, so each period's refill happens exactly once however many
   * instances race. An unlimited (or vanished) balance spends nothing and
   * answers `{ ok: true, remaining: null }`. A key whose balance moved by a
   * reroll (`creditsKeyId`) spends from the key it moved to.
   *
   * `signal` is the verification's: once it has aborted, the store writes
   * nothing and rejects with its reason. The store checks it at the last
   * moment before the write (after waiting for a lock, for instance): that
   * write is the verification's commit point.
   */
  spendCredits(target: CreditsTarget, cost: number, refill: RefillDue | null, signal?: AbortSignal): Promise<SpendResult>;

  /**
   * Gives back `cost` credits a spend took (a verification whose call ended
   * while its spend was being written), only if the balance is still in the
   * refill period the spend was made in (`refilledAt`, from its SpendResult):
   * a refill since has set the balance anew. Returns whether it gave back.
   */
  returnCredits(target: CreditsTarget, cost: number, refilledAt: number | null): Promise<boolean>;

  /**
   * Every write of a key or identity (by any instance) is recorded in the change
   * feed (see Change). Returns retained changes with a seq above `afterSeq`,
   * oldest first, at most `limit`. When change `afterSeq + 1` does not exist the
   * answer may be empty even if later ones do (an entry can only be missing if
   * it was pruned or lost), unless `pastGaps` is set.
   */
  changesSince(afterSeq: number, limit: number, opts?: { pastGaps?: boolean }): Promise<Change[]>;
  /** The oldest retained change's seq minus one (the newest seq when none is retained, 0 for an empty feed): where a starting reader begins. */
  changeFeedStart(): Promise<number>;
  /** The newest change's seq (0 when none). */
  lastChangeSeq(): Promise<number>;
  /** Forgets the changes with a seq below `beforeSeq` (never the newest). */
  pruneChanges(beforeSeq: number): Promise<void>;

  /**
   * Adds usage rows to the stored counts (an atomic increment per row). A row
   * already incremented by the same `batch` (writer and seq) is not incremented
   * again, so a retried batch is never counted twice.
   */
  writeUsage(rows: UsageRow[], batch: { writer: string; seq: number }): Promise<void>;
  /** Rows of one identity or key in a range; throws InvalidArgumentError past `maxRows`. */
  queryUsage(q: UsageQuery): Promise<UsageRow[]>;
  /** Raises keys' last_used_at to the given times (never lowers it). No change event. */
  touchLastUsed(times: Map<string, number>): Promise<void>;
  /** Deletes rows of a granularity with a bucket before `before`. */
  pruneUsage(granularity: "minute" | "hour" | "day", before: number): Promise<void>;

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
