import type {
  Credits,
  CreditsOp,
  CreditsTarget,
  IdentityPatch,
  IdentityRecord,
  KeyPatch,
  KeyRecord,
  RootKeyRecord,
} from "../../domain/types.js";
import type { UsageQuery, UsageRow } from "../../domain/usage.js";
import type { Change, KeyFilter, PageQuery, CommitSignal, RefillDue, SpendResult, Store, StoreCapabilities } from "../store.js";
import { MongoContext } from "./context.js";
import { MongoChangeFeed } from "./change-feed.js";
import { MongoKeys } from "./keys.js";
import { MongoCredits } from "./credits.js";
import { MongoIdentities } from "./identities.js";
import { MongoKeyRefs } from "./key-refs.js";
import { MongoRootKeys } from "./root-keys.js";
import { DEFAULT_USAGE_ROLLUP_MS, MongoUsage } from "./usage.js";
export type { MongoStoreOptions } from "./context.js";
export { toFeedDoc, toIdentityDoc, toKeyDoc, type FeedEntry } from "./documents.js";

/**
 * The production store on MongoDB (tested on MongoDB-compatible FerretDB as
 * well). It relies on one atomic primitive only: inserting a document with a
 * unique `_id` or unique index. FerretDB 1.x applies every update as a read
 * followed by a whole-document write, so two concurrent updates of one
 * document can lose one; therefore every read-modify-write of a key or
 * identity runs under a per-document lease lock (`locked`), usage rows are
 * written by one writer each, and last-used times live in their own collection. No multi-document transactions are used, so it runs on FerretDB and
 * standalone servers: each method is one atomic single-document operation, or
 * a short sequence ordered so that a failure leaves nothing half-visible (and
 * compensated where it could).
 *
 * This class only hands each Store method to the part of its aggregate
 * (identities.ts, keys.ts, credits.ts, change-feed.ts, usage.ts,
 * root-keys.ts; key-refs.ts finds a key's documents on either layout). The
 * parts share the context this class extends (context.ts: collections,
 * options, `run`, `locked`, the change feed's appender and `changing`); the
 * FerretDB workarounds are in ferretdb.ts.
 */
export class MongoStore extends MongoContext implements Store {
  readonly kind = "mongodb" as const;
  /** Shared by every instance; FerretDB (known after `init`) applies a conditional $inc as a read and a write. */
  get capabilities(): StoreCapabilities {
    return { shared: true, atomicUpdates: this.flavor === "mongodb", counterClient: this.client };
  }
  private readonly keyRefs = new MongoKeyRefs(this);
  private readonly feedPart = new MongoChangeFeed(this);
  private readonly creditPart = new MongoCredits(this, this.keyRefs);
  private readonly keyPart = new MongoKeys(this, this.keyRefs, this.creditPart);
  private readonly identityPart = new MongoIdentities(this, this.keyRefs);
  private readonly rootKeyPart = new MongoRootKeys(this);
  private readonly usagePart = new MongoUsage(this);
  private rollupTimer: NodeJS.Timeout | null = null;

  changesSince(afterSeq: number, limit: number, opts: { pastGaps?: boolean } = {}): Promise<Change[]> {
    return this.feedPart.changesSince(afterSeq, limit, opts);
  }
  changeFeedStart(): Promise<number> {
    return this.feedPart.changeFeedStart();
  }
  lastChangeSeq(): Promise<number> {
    return this.feedPart.lastChangeSeq();
  }
  pruneChanges(beforeSeq: number): Promise<void> {
    return this.feedPart.pruneChanges(beforeSeq);
  }

  createRootKey(rec: RootKeyRecord): Promise<void> {
    return this.rootKeyPart.createRootKey(rec);
  }
  getRootKeyByHash(hash: string): Promise<RootKeyRecord | null> {
    return this.rootKeyPart.getRootKeyByHash(hash);
  }
  listRootKeys(): Promise<RootKeyRecord[]> {
    return this.rootKeyPart.listRootKeys();
  }
  deleteRootKey(id: string): Promise<boolean> {
    return this.rootKeyPart.deleteRootKey(id);
  }
  createFirstRootKey(rec: RootKeyRecord): Promise<boolean> {
    return this.rootKeyPart.createFirstRootKey(rec);
  }

  writeUsage(rows: UsageRow[], batch: { writer: string; seq: number }): Promise<void> {
    this.startRollups();
    return this.usagePart.writeUsage(rows, batch);
  }
  /**
   * Every usageRollupMs once usage or last-used times were written: the usage
   * log applied to the rows (usage.ts) and the collected last-used times
   * written (keys.ts), each on its own, so one failing does not hold back the other.
   */
  private startRollups(): void {
    const every = this.opts.usageRollupMs ?? DEFAULT_USAGE_ROLLUP_MS;
    if (this.rollupTimer || every <= 0) return;
    this.rollupTimer = setInterval(() => {
      void this.usagePart.rollUp({ deferDeletes: true }).catch(() => undefined);
      void this.keyPart.flushLastUsed().catch(() => undefined);
    }, every);
    this.rollupTimer.unref();
  }
  /**
   * Applies the usage log of this process's writer slots to the usage rows, and
   * writes the last-used times collected on the bucketed layout (keys.ts), now
   * (otherwise every usageRollupMs and at close).
   */
  async rollUpUsage(): Promise<void> {
    await this.usagePart.rollUp();
    await this.keyPart.flushLastUsed();
  }
  override async close(): Promise<void> {
    if (this.rollupTimer) clearInterval(this.rollupTimer);
    this.rollupTimer = null;
    await this.usagePart.close();
    await this.keyPart.close();
    await super.close();
  }
  queryUsage(q: UsageQuery): Promise<UsageRow[]> {
    return this.usagePart.queryUsage(q);
  }
  pruneUsage(granularity: "minute" | "hour" | "day", before: number): Promise<void> {
    return this.usagePart.pruneUsage(granularity, before);
  }

  createIdentity(rec: IdentityRecord): Promise<void> {
    return this.identityPart.createIdentity(rec);
  }
  ensureIdentity(rec: IdentityRecord): Promise<{ identity: IdentityRecord; created: boolean }> {
    return this.identityPart.ensureIdentity(rec);
  }
  getIdentity(id: string): Promise<IdentityRecord | null> {
    return this.identityPart.getIdentity(id);
  }
  getIdentityByExternalId(externalId: string): Promise<IdentityRecord | null> {
    return this.identityPart.getIdentityByExternalId(externalId);
  }
  getIdentities(ids: string[]): Promise<IdentityRecord[]> {
    return this.identityPart.getIdentities(ids);
  }
  listIdentities(page: PageQuery, search: string | null): Promise<IdentityRecord[]> {
    return this.identityPart.listIdentities(page, search);
  }
  updateIdentity(id: string, patch: IdentityPatch, now: number): Promise<IdentityRecord | null> {
    return this.identityPart.updateIdentity(id, patch, now);
  }
  deleteIdentity(id: string, deleteKeys: boolean): Promise<{ deletedKeys: number; unlinkedKeys: number } | null> {
    return this.identityPart.deleteIdentity(id, deleteKeys);
  }
  loadIdentities(records: IdentityRecord[]): Promise<void> {
    return this.identityPart.loadIdentities(records);
  }

  updateCredits(target: CreditsTarget, op: CreditsOp, now: number, refill: RefillDue | null): Promise<Credits | null | undefined> {
    return this.creditPart.updateCredits(target, op, now, refill);
  }
  spendCredits(target: CreditsTarget, cost: number, refill: RefillDue | null, signal?: CommitSignal): Promise<SpendResult> {
    return this.creditPart.spendCredits(target, cost, refill, signal);
  }
  returnCredits(target: CreditsTarget, cost: number, refilledAt: number | null): Promise<boolean> {
    return this.creditPart.returnCredits(target, cost, refilledAt);
  }
  readCreditsHolder(target: CreditsTarget): Promise<{ credits: Credits | null; creditsKeyId: string | null; seq: number } | null> {
    return this.creditPart.readCreditsHolder(target);
  }
  persistCredits(
    target: CreditsTarget,
    state: { remaining: number | null; lastRefillAt?: number },
    seq: number,
    opts: { updatedAt?: number; recordChange?: boolean } = {},
  ): Promise<"written" | "stale" | "missing"> {
    return this.creditPart.persistCredits(target, state, seq, opts);
  }

  createKey(rec: KeyRecord): Promise<void> {
    return this.keyPart.createKey(rec);
  }
  loadKeys(records: KeyRecord[]): Promise<void> {
    return this.keyPart.loadKeys(records);
  }
  getKey(id: string): Promise<KeyRecord | null> {
    return this.keyPart.getKey(id);
  }
  getKeyByHash(hash: string): Promise<KeyRecord | null> {
    return this.keyPart.getKeyByHash(hash);
  }
  listKeys(filter: KeyFilter, page: PageQuery): Promise<KeyRecord[]> {
    return this.keyPart.listKeys(filter, page);
  }
  updateKey(id: string, patch: KeyPatch, now: number): Promise<KeyRecord | null> {
    return this.keyPart.updateKey(id, patch, now);
  }
  deleteKey(id: string): Promise<boolean> {
    return this.keyPart.deleteKey(id);
  }
  rerollKey(oldId: string, next: KeyRecord, oldExpiresAt: number, now: number): Promise<KeyRecord | null> {
    return this.keyPart.rerollKey(oldId, next, oldExpiresAt, now);
  }
  touchLastUsed(times: Map<string, number>): Promise<void> {
    this.startRollups();
    return this.keyPart.touchLastUsed(times);
  }
}
