import type { Collection } from "mongodb";
import { FailedPreconditionError, UnavailableError } from "../../domain/errors.js";
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
import { type UsageQuery, type UsageRow } from "../../domain/usage.js";
import { applyCreditsOp, spendFromBalance } from "../../domain/credits.js";
import { FENCE, fenceFilter } from "./lease-lock.js";
import type { Change, KeyFilter, PageQuery, RefillDue, SpendResult, Store, StoreCapabilities } from "../store.js";
import { keyIdCollection } from "./ferretdb.js";
import {
  fromKeyDoc,
  identityTargets,
  keyTargets,
  setOf,
  toBucketedKeyDoc,
  toKeyDoc,
  type CreditsDoc,
  type KeyDoc,
} from "./documents.js";
import { isDuplicateKey } from "./errors.js";
import { MongoContext } from "./context.js";
import { MongoChangeFeed } from "./change-feed.js";
import { MongoIdentities } from "./identities.js";
import { MongoKeyRefs } from "./key-refs.js";
import { eachLimited, groupBy } from "./util.js";
import { hashBucketKey } from "./ferretdb.js";
import { MongoRootKeys } from "./root-keys.js";
import { MongoUsage } from "./usage.js";
export type { MongoStoreOptions } from "./context.js";

export { toFeedDoc, toIdentityDoc, toKeyDoc, type FeedEntry } from "./documents.js";

/** A spend waiting for its balance's lock (see MongoStore.spendLocked). */
type PendingSpend = {
  cost: number;
  refill: RefillDue | null;
  signal?: AbortSignal;
  resolve: (r: SpendResult) => void;
  reject: (err: unknown) => void;
};

/** How many reroll moves a key's balance is followed through. */
const MAX_CREDIT_HOPS = 8;
/** How often a conditional credit write is tried again after a concurrent write changed its document. */
const MAX_CAS_TRIES = 20;
/**
 * A filter for a balance's document beside other conditions: on the bucketed
 * layout also its key id (`_id` is the hash, see MongoStore.readKey).
 */
const filterOf = (ref: { id: string; keyId?: string }): Record<string, unknown> => (ref.keyId && ref.keyId !== ref.id ? { _id: ref.id, keyId: ref.keyId } : { _id: ref.id });
/** The lease lock of a balance's document. */
const lockOf = (target: CreditsTarget) => ("keyId" in target ? `key:${target.keyId}` : `identity:${target.identityId}`);

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
 */
export class MongoStore extends MongoContext implements Store {
  readonly kind = "mongodb" as const;
  /** Shared by every instance; FerretDB (known after `init`) applies a conditional $inc as a read and a write. */
  get capabilities(): StoreCapabilities {
    return { shared: true, atomicUpdates: this.flavor === "mongodb", counterClient: this.client };
  }
  private readonly keyRefs = new MongoKeyRefs(this);
  private readonly feedPart = new MongoChangeFeed(this);
  private readonly identityPart = new MongoIdentities(this, this.keyRefs);
  private readonly rootKeyPart = new MongoRootKeys(this);
  private readonly usagePart = new MongoUsage(this);

  async createKey(rec: KeyRecord): Promise<void> {
    await this.run(() => this.insertKey(rec));
  }

  /**
   * Indexed layout: one insert; the unique hash index refuses a taken hash.
   * Bucketed: the id pointer first (a pointer without its key finds nothing),
   * then the key at `_id` = its hash, which refuses a taken hash; a refused key
   * takes its pointer back. The change clears negative cache entries for this
   * hash on every instance.
   */
  private async insertKey(rec: KeyRecord): Promise<void> {
    const targets = keyTargets({ id: rec.id, hash: rec.hash });
    if (this.layout === "indexed") {
      await this.changing(targets, (o) => this.keys.insertOne(toKeyDoc(rec), o));
      return;
    }
    const pointer = this.keyRefs.keyIdColl(rec.id);
    try {
      await pointer.insertOne({ _id: rec.id, hash: rec.hash });
    } catch (err) {
      // The same key written again (a retry) finds its own pointer; another hash means the id is taken.
      if (!isDuplicateKey(err) || (await pointer.findOne({ _id: rec.id }))?.hash !== rec.hash) throw err;
    }
    try {
      await this.changing(targets, (o) => this.keyRefs.keyHashColl(rec.hash).insertOne(toBucketedKeyDoc(rec), o));
    } catch (err) {
      if (isDuplicateKey(err)) {
        const holder = await this.keyRefs.keyHashColl(rec.hash).findOne({ _id: rec.hash });
        if (holder?.keyId !== rec.id) await pointer.deleteOne({ _id: rec.id });
      }
      throw err;
    }
    this.keyRefs.rememberHash(rec.id, rec.hash);
  }

  /**
   * For seeding a database no instance serves yet (the benchmark): writes keys
   * in bulk in this database's layout, with no change-feed entries (there is no
   * cache to tell). Each key must be new.
   */
  async loadKeys(records: KeyRecord[]): Promise<void> {
    await this.run(async () => {
      if (this.layout === "indexed") {
        for (let i = 0; i < records.length; i += 1000) await this.keys.insertMany(records.slice(i, i + 1000).map(toKeyDoc));
        return;
      }
      // Buckets written 8 at a time: most of the time here is FerretDB creating thousands of collections.
      await eachLimited([...groupBy(records, (r) => keyIdCollection(r.id)).values()], 8, (group) =>
        this.keyRefs.keyIdColl(group[0].id).insertMany(group.map((r) => ({ _id: r.id, hash: r.hash }))),
      );
      await eachLimited([...groupBy(records, (r) => hashBucketKey(r.hash)).values()], 8, (group) =>
        this.keyRefs.keyHashColl(group[0].hash).insertMany(group.map(toBucketedKeyDoc)),
      );
    });
  }

  async getKey(id: string): Promise<KeyRecord | null> {
    const d = await this.run(async () => this.keyRefs.readKey(await this.keyRefs.keyRef(id)));
    return d ? (await this.withMovedBalances(await this.withLastUsed([fromKeyDoc(d)])))[0] : null;
  }

  /** Adds last-used times, kept apart from key documents (see the class comment). */
  private async withLastUsed(keys: KeyRecord[]): Promise<KeyRecord[]> {
    if (keys.length === 0) return keys;
    const at = new Map<string, number>();
    await this.run(async () => {
      if (this.layout === "indexed") {
        for (const d of await this.activity.find({ _id: { $in: keys.map((k) => k.id) } }).toArray()) at.set(d._id, d.lastUsedAt);
        return;
      }
      for (const group of groupBy(keys, (k) => keyIdCollection(k.id)).values()) {
        const coll = this.keyRefs.keyIdColl(group[0].id);
        // One id: an `_id` lookup, the one filter FerretDB pushes down.
        const docs = group.length === 1 ? [await coll.findOne({ _id: group[0].id })].filter((d) => d !== null) : await coll.find({ _id: { $in: group.map((k) => k.id) } }).toArray();
        for (const d of docs) if (d.lastUsedAt !== undefined) at.set(d._id, d.lastUsedAt);
      }
    });
    return keys.map((k) => ({ ...k, lastUsedAt: at.get(k.id) ?? k.lastUsedAt }));
  }

  /** A key whose balance moved by a reroll shows the balance it spends from (none once that key is gone). */
  private async withMovedBalances(keys: KeyRecord[]): Promise<KeyRecord[]> {
    if (!keys.some((k) => k.creditsKeyId)) return keys;
    return Promise.all(
      keys.map(async (k) => {
        if (!k.creditsKeyId) return k;
        const { doc } = await this.balanceHolder({ keyId: k.id });
        return { ...k, credits: doc?.credits ?? { remaining: 0, refill: null } };
      }),
    );
  }

  /** One read: on the bucketed layout an `_id` lookup in one bucket (ferretdb.ts), on the indexed one the hash index. */
  async getKeyByHash(hash: string): Promise<KeyRecord | null> {
    const d = await this.run(() => (this.layout === "indexed" ? this.keys.findOne({ hash }) : this.keyRefs.keyHashColl(hash).findOne({ _id: hash })));
    if (!d) return null;
    const rec = fromKeyDoc(d);
    this.keyRefs.rememberHash(rec.id, rec.hash);
    return (await this.withMovedBalances([rec]))[0];
  }

  async listKeys(filter: KeyFilter, page: PageQuery): Promise<KeyRecord[]> {
    const q: Record<string, unknown> = {};
    if (filter.apiId !== undefined) q.apiId = filter.apiId;
    if (filter.identityId !== undefined) q.identityId = filter.identityId;
    const docs = await this.run(async () => {
      if (this.layout === "indexed") return this.keys.find({ _id: { $gt: page.afterId ?? "" }, ...q }).sort({ _id: 1 }).limit(page.limit).toArray();
      // Every bucket's first page, merged: keys are spread by hash, listed by id.
      const merged: KeyDoc[] = [];
      for (const coll of await this.buckets.hashBuckets<KeyDoc>()) {
        merged.push(...(await coll.find({ keyId: { $gt: page.afterId ?? "" }, ...q }).sort({ keyId: 1 }).limit(page.limit).toArray()));
      }
      return merged.sort((a, b) => (a.keyId! < b.keyId! ? -1 : 1)).slice(0, page.limit);
    });
    return this.withMovedBalances(await this.withLastUsed(docs.map(fromKeyDoc)));
  }

  async updateKey(id: string, patch: KeyPatch, now: number): Promise<KeyRecord | null> {
    // New credits are the key's own, also for a key whose balance had moved by a reroll.
    const update = {
      $set: setOf(patch, now),
      $inc: { version: 1, [FENCE]: 1 },
      ...(patch.credits !== undefined ? { $unset: { creditsKeyId: "" as const } } : {}),
    };
    const d = await this.run(() =>
      this.locked(`key:${id}`, async () => {
        const ref = await this.keyRefs.keyRef(id);
        const cur = await this.keyRefs.readKey(ref);
        if (!ref || !cur) return null;
        return this.changing(keyTargets({ id, hash: cur.hash }), (o) => ref.coll.findOneAndUpdate({ _id: ref._id }, update, { returnDocument: "after", ...o }));
      }),
    );
    if (!d) return null;
    return (await this.withMovedBalances(await this.withLastUsed([fromKeyDoc(d)])))[0];
  }

  async deleteKey(id: string): Promise<boolean> {
    const ref = await this.run(() => this.keyRefs.keyRef(id));
    const cur = await this.run(() => this.keyRefs.readKey(ref));
    if (!ref || !cur) return false;
    const d = await this.run(() => this.changing(keyTargets({ id, hash: cur.hash }), (o) => ref.coll.findOneAndDelete({ _id: ref._id }, o)));
    if (!d) return false;
    await this.run(() => this.keyRefs.dropKeyPointers([{ id }]));
    return true;
  }

  /**
   * The new key is stored with the old key's balance as it is, then the old key
   * is pointed at it (`creditsKeyId`) by a compare-and-set on its write counter:
   * a spend that landed in between (conditional writes take no lock) makes the
   * set fail, and the balance is taken again. The new key's plaintext is not yet
   * known to anyone, so nothing spends from it before the move. A crash half-way
   * leaves a new key nobody holds the secret of, never two live balances.
   */
  async rerollKey(oldId: string, next: KeyRecord, oldExpiresAt: number, now: number): Promise<KeyRecord | null> {
    const { creditsKeyId: _ignored, ...base } = next;
    // A key that itself spends from another passes that on; else its own balance moves.
    const withBalanceOf = (o: KeyDoc): KeyRecord => (o.creditsKeyId ? { ...base, credits: null, creditsKeyId: o.creditsKeyId } : { ...base, credits: o.credits });
    return this.run(() =>
      this.locked(`key:${oldId}`, async () => {
        const ref = await this.keyRefs.keyRef(oldId);
        let old = await this.keyRefs.readKey(ref);
        if (!ref || !old) return null;
        let stored = withBalanceOf(old);
        await this.insertKey(stored);
        const nextRef = this.keyRefs.keyRefOf(next);
        try {
          // The old key's write sits between an intent and a done entry of the change feed, like every key write.
          const gone = await this.changing(keyTargets({ id: oldId, hash: old.hash }), async (o) => {
            for (let tries = 0; ; tries++) {
              const moves = old!.credits !== null && !old!.creditsKeyId;
              const moved = { expiresAt: oldExpiresAt, updatedAt: now, ...(moves ? { credits: null, creditsKeyId: next.id } : {}) };
              const res = await ref.coll.updateOne({ _id: ref._id, ...fenceFilter(old!) }, { $set: moved, $inc: { version: 1, [FENCE]: 1 } }, o);
              if (res.matchedCount === 1) return false;
              old = await this.keyRefs.readKey(ref);
              if (!old) return true;
              if (tries >= MAX_CAS_TRIES) throw new UnavailableError("the key's balance kept changing during the reroll; retry");
              stored = withBalanceOf(old);
              await nextRef.coll.updateOne({ _id: nextRef._id }, { $set: { credits: stored.credits } });
            }
          });
          if (gone) {
            await this.deleteKey(next.id);
            return null;
          }
        } catch (err) {
          await this.deleteKey(next.id).catch(() => undefined);
          throw err;
        }
        return (await this.withMovedBalances([stored]))[0];
      }),
    );
  }

  /**
   * The document holding `target`'s own balance: its collection, `_id` and lock.
   * Null for a key that does not exist (bucketed layout: no id pointer).
   */
  private async creditsRef(target: CreditsTarget): Promise<{ coll: Collection<CreditsDoc>; id: string; lock: string; keyId?: string } | null> {
    if (!("keyId" in target)) return { coll: this.identities as unknown as Collection<CreditsDoc>, id: target.identityId, lock: `identity:${target.identityId}` };
    const ref = await this.keyRefs.keyRef(target.keyId);
    if (!ref) return null;
    return { coll: ref.coll as unknown as Collection<CreditsDoc>, id: ref._id, lock: `key:${target.keyId}`, keyId: target.keyId };
  }

  /** The document of a credits ref (null when there is none, or its `_id` now holds another key). */
  private async readCredits(ref: { coll: Collection<CreditsDoc>; id: string; keyId?: string } | null): Promise<CreditsDoc | null> {
    if (!ref) return null;
    const d = await ref.coll.findOne({ _id: ref.id });
    return d && (!ref.keyId || (d.keyId ?? d._id) === ref.keyId) ? d : null;
  }

  /**
   * The document holding the balance of `target`: for a key, itself or the key
   * its balance moved to by a reroll (followed through a chain). `gone` when the
   * balance moved to a key that no longer exists; `doc` null when the target
   * does not exist.
   */
  private async balanceHolder(target: CreditsTarget): Promise<{ target: CreditsTarget; doc: CreditsDoc | null; gone: boolean }> {
    let doc = await this.readCredits(await this.creditsRef(target));
    if (!("keyId" in target)) return { target, doc, gone: false };
    let id = target.keyId;
    for (let hops = 0; doc?.creditsKeyId && hops < MAX_CREDIT_HOPS; hops++) {
      id = doc.creditsKeyId;
      doc = await this.readCredits(await this.creditsRef({ keyId: id }));
      if (!doc) return { target: { keyId: id }, doc: null, gone: true };
    }
    return { target: { keyId: id }, doc, gone: false };
  }

  /**
   * A read-modify-write of a balance: `compute` gets the holder's document and
   * returns the new credits. "locked": under the holder's lease lock, with a
   * fenced write — a miss means this process lost the lock, and nothing is
   * written. "conditional": no lock, a compare-and-set on the write counter,
   * tried again when a concurrent write moved it.
   */
  private async rmwCredits<T>(
    target: CreditsTarget,
    compute: (doc: CreditsDoc) => { credits: Credits | null; result: T },
    opts: { updatedAt?: number; record?: boolean } = {},
  ): Promise<{ result: T; doc: CreditsDoc } | "missing" | "gone"> {
    let current = target;
    for (let tries = 0, hops = 0; tries < MAX_CAS_TRIES; tries++) {
      const lock = lockOf(current);
      const attempt = async () => {
        const ref = await this.creditsRef(current);
        const cur = await this.readCredits(ref);
        if (!ref || !cur) return hops === 0 ? ("missing" as const) : ("gone" as const);
        const { coll, id } = ref;
        if (cur.creditsKeyId) return { moved: cur.creditsKeyId };
        const { credits, result } = compute(cur);
        const set = { credits, ...(opts.updatedAt !== undefined ? { updatedAt: opts.updatedAt } : {}) };
        // A change of the balance's rule or amount (UpdateCredits) is recorded for the caches; a return of spent credits is not.
        const write = (o: { maxTimeMS?: number } = {}) =>
          coll.updateOne({ _id: id, ...fenceFilter(cur) }, { $set: set, $inc: opts.record ? { version: 1, [FENCE]: 1 } : { [FENCE]: 1 } }, o);
        const targets = "keyId" in current ? keyTargets({ id: current.keyId, hash: cur.hash! }) : identityTargets(id);
        const res = opts.record ? await this.changing(targets, write) : await write();
        if (res.matchedCount === 1) return { result, doc: cur };
        if (this.creditWrites === "locked") throw new UnavailableError(`lost the lock on ${lock} while writing; nothing written`);
        return "retry" as const;
      };
      const out = this.creditWrites === "locked" ? await this.locked(lock, attempt) : await attempt();
      if (out === "missing" || out === "gone") return out;
      if (out === "retry") continue;
      if ("moved" in out) {
        if (++hops > MAX_CREDIT_HOPS) return "gone";
        current = { keyId: out.moved! };
        continue;
      }
      return out;
    }
    throw new UnavailableError("the balance kept changing; retry");
  }

  async updateCredits(target: CreditsTarget, op: CreditsOp, now: number, refill: RefillDue | null): Promise<Credits | null | undefined> {
    return this.run(async () => {
      const out = await this.rmwCredits(
        target,
        (doc) => {
          const credits = applyCreditsOp(doc.credits, op, refill);
          return { credits, result: credits };
        },
        { updatedAt: now, record: true },
      );
      if (out === "missing") return undefined;
      if (out === "gone") throw new FailedPreconditionError("this key's balance moved to a key that was deleted");
      return out.result;
    });
  }

  async spendCredits(target: CreditsTarget, cost: number, refill: RefillDue | null, signal?: AbortSignal): Promise<SpendResult> {
    return this.run(() =>
      this.creditWrites === "conditional" ? this.spendConditionally(target, cost, refill, signal) : this.spendLocked(target, { cost, refill, signal }),
    );
  }

  /** Spends waiting in this process for one balance, applied together in one locked read and write. */
  private readonly spendBatches = new Map<string, PendingSpend[]>();

  /**
   * FerretDB: spends under the balance's lease lock. Spends of one balance that
   * arrive while one is in progress are queued and applied together, in order,
   * in the next lock cycle: one read and one fenced write for all of them (each
   * checked against the balance left by those before it; a spend whose signal
   * aborted by then is left out). The queue is bounded: past 16 × `queueMax`
   * (1,024) a spend is refused at once (UNAVAILABLE).
   */
  private spendLocked(target: CreditsTarget, spend: Omit<PendingSpend, "resolve" | "reject">, hops = 0): Promise<SpendResult> {
    const lock = lockOf(target);
    const queued = this.spendBatches.get(lock);
    if (queued && queued.length >= (this.opts.lock?.queueMax ?? 64) * 16) {
      return Promise.reject(new UnavailableError(`busy: ${queued.length} spends already wait for ${lock}; retry`));
    }
    return new Promise<SpendResult>((resolve, reject) => {
      // A spend whose verification is cancelled while it waits answers at once; the
      // batch leaves it out (it checks the signal at its commit point).
      const onAbort = () => reject(spend.signal!.reason);
      spend.signal?.addEventListener("abort", onAbort, { once: true });
      const settle = <A>(f: (a: A) => void) => (a: A) => {
        spend.signal?.removeEventListener("abort", onAbort);
        f(a);
      };
      const pending: PendingSpend = { ...spend, resolve: settle(resolve), reject: settle(reject) };
      if (queued) {
        queued.push(pending);
        return;
      }
      this.spendBatches.set(lock, [pending]);
      void this.runSpendBatches(target, lock, hops);
    });
  }

  private async runSpendBatches(target: CreditsTarget, lock: string, hops: number): Promise<void> {
    for (;;) {
      const batch = this.spendBatches.get(lock)!;
      if (batch.length === 0) {
        this.spendBatches.delete(lock);
        return;
      }
      this.spendBatches.set(lock, []);
      try {
        const moved = await this.locked(lock, async () => {
          const ref = await this.creditsRef(target);
          const cur = await this.readCredits(ref);
          if (!ref || !cur) {
            for (const p of batch) p.resolve(hops === 0 ? { ok: true, remaining: null } : { ok: false, remaining: 0 });
            return null;
          }
          if (cur.creditsKeyId) return cur.creditsKeyId;
          if (!cur.credits) {
            for (const p of batch) p.resolve({ ok: true, remaining: null });
            return null;
          }
          // The commit point of each spend: it is left out once its signal aborted.
          let credits = cur.credits;
          let changed = false;
          const results: [PendingSpend, SpendResult][] = [];
          for (const p of batch) {
            if (p.signal?.aborted) {
              p.reject(p.signal.reason);
              continue;
            }
            const r = spendFromBalance(credits, p.cost, p.refill);
            credits = r.credits;
            changed ||= r.changed;
            results.push([p, { ok: r.ok, remaining: r.credits.remaining, refilledAt: r.credits.refill?.lastRefillAt ?? null }]);
          }
          if (changed) {
            const res = await ref.coll.updateOne({ _id: ref.id, ...fenceFilter(cur) }, { $set: { credits }, $inc: { [FENCE]: 1 } });
            if (res.matchedCount !== 1) throw new UnavailableError(`lost the lock on ${lock} while writing; nothing written`);
          }
          for (const [p, r] of results) p.resolve(r);
          return null;
        });
        if (moved !== null) {
          // The balance moved by a reroll: these spends go to the key it moved to.
          for (const p of batch) {
            if (hops >= MAX_CREDIT_HOPS) p.resolve({ ok: false, remaining: 0 });
            else this.spendLocked({ keyId: moved }, p, hops + 1).then(p.resolve, p.reject);
          }
        }
      } catch (err) {
        for (const p of batch) p.reject(err);
      }
    }
  }

  async returnCredits(target: CreditsTarget, cost: number, refilledAt: number | null): Promise<boolean> {
    const samePeriod = (c: Credits | null) => !!c && (c.refill?.lastRefillAt ?? null) === refilledAt;
    if (this.creditWrites === "locked") {
      const out = await this.run(() =>
        this.rmwCredits(target, (doc) => {
          if (!samePeriod(doc.credits)) return { credits: doc.credits, result: false };
          return { credits: { ...doc.credits!, remaining: doc.credits!.remaining + cost }, result: true };
        }),
      );
      return typeof out === "object" && out.result;
    }
    // MongoDB: one conditional $inc, on the holder of the balance.
    return this.run(async () => {
      let current = target;
      for (let hops = 0; hops <= MAX_CREDIT_HOPS; hops++) {
        const ref = await this.creditsRef(current);
        if (!ref) return false;
        const filter: Record<string, unknown> = { ...filterOf(ref), creditsKeyId: null, credits: { $ne: null } };
        if (refilledAt === null) filter["credits.refill"] = null;
        else filter["credits.refill.lastRefillAt"] = refilledAt;
        const res = await ref.coll.updateOne(filter, { $inc: { "credits.remaining": cost, [FENCE]: 1 } });
        if (res.matchedCount === 1) return true;
        const cur = await this.readCredits(ref);
        if (!cur?.creditsKeyId) return false;
        current = { keyId: cur.creditsKeyId };
      }
      return false;
    });
  }

  /**
   * For the credit ledger (redis-credits.ts): one document's balance as stored —
   * its credits, where its balance moved (`creditsKeyId`) and the ledger
   * sequence last written (`seq`, 0 when never). Null when it does not exist.
   */
  async readCreditsHolder(target: CreditsTarget): Promise<{ credits: Credits | null; creditsKeyId: string | null; seq: number } | null> {
    const d = await this.run(async () => this.readCredits(await this.creditsRef(target)));
    return d ? { credits: d.credits, creditsKeyId: d.creditsKeyId ?? null, seq: d.creditsSeq ?? 0 } : null;
  }

  /**
   * For the credit ledger: writes a balance (`remaining` null: unlimited; the
   * refill rule stays the document's, with `lastRefillAt`) if `seq` is newer
   * than the one written last — so flushes from several instances, in any order,
   * never go back. Under the lease lock (fenced) in "locked" mode, a
   * compare-and-set otherwise. "stale": a newer balance is there, or the balance
   * moved away by a reroll; "missing": no such document.
   */
  async persistCredits(
    target: CreditsTarget,
    state: { remaining: number | null; lastRefillAt?: number },
    seq: number,
    opts: { updatedAt?: number; recordChange?: boolean } = {},
  ): Promise<"written" | "stale" | "missing"> {
    const lock = lockOf(target);
    const attempt = async () => {
      const ref = await this.creditsRef(target);
      const cur = await this.readCredits(ref);
      if (!ref || !cur) return "missing" as const;
      const { coll, id } = ref;
      if (cur.creditsKeyId || (cur.creditsSeq ?? 0) >= seq) return "stale" as const;
      const refill = cur.credits?.refill ?? null;
      const credits: Credits | null =
        state.remaining === null ? null : { remaining: state.remaining, refill: refill ? { ...refill, lastRefillAt: state.lastRefillAt ?? refill.lastRefillAt } : null };
      const set = { credits, creditsSeq: seq, ...(opts.updatedAt !== undefined ? { updatedAt: opts.updatedAt } : {}) };
      // A write-through of an operator's change is recorded for the caches (between an intent and a done entry); a write-back of spends is not.
      const write = (o: { maxTimeMS?: number } = {}) =>
        coll.updateOne({ _id: id, ...fenceFilter(cur) }, { $set: set, $inc: opts.recordChange ? { version: 1, [FENCE]: 1 } : { [FENCE]: 1 } }, o);
      const targets = "keyId" in target ? keyTargets({ id: target.keyId, hash: cur.hash! }) : identityTargets(id);
      const res = opts.recordChange ? await this.changing(targets, write) : await write();
      if (res.matchedCount === 1) return { hash: cur.hash ?? null };
      if (this.creditWrites === "locked") throw new UnavailableError(`lost the lock on ${lock} while writing; nothing written`);
      return "retry" as const;
    };
    return this.run(async () => {
      for (let tries = 0; tries < MAX_CAS_TRIES; tries++) {
        const out = this.creditWrites === "locked" ? await this.locked(lock, attempt) : await attempt();
        if (out === "retry") continue;
        if (typeof out === "string") return out;
        return "written";
      }
      throw new UnavailableError(`the balance of ${lock} kept changing; retry`);
    });
  }

  /**
   * MongoDB: one conditional update per spend in the common case — `remaining ≥
   * cost` (and, when a refill may be due, "already refilled for this period") in
   * the filter, `$inc` in the update. It relies on MongoDB applying a single
   * document's update with its filter atomically; the refill is a compare-and-set
   * on the refill time. Also run on FerretDB in CI, with one writer.
   */
  private async spendConditionally(target: CreditsTarget, cost: number, refill: RefillDue | null, signal?: AbortSignal): Promise<SpendResult> {
    let current = target;
    let due = refill;
    for (let tries = 0, hops = 0; tries < MAX_CAS_TRIES; tries++) {
      const ref = await this.creditsRef(current);
      if (!ref) return hops === 0 ? { ok: true, remaining: null } : { ok: false, remaining: 0 };
      const { coll } = ref;
      const filter: Record<string, unknown> = { ...filterOf(ref), creditsKeyId: null, "credits.remaining": { $gte: cost } };
      if (due) filter["credits.refill.lastRefillAt"] = { $gte: due.periodStart };
      signal?.throwIfAborted(); // the commit point
      // No projection: FerretDB does not implement one on findAndModify.
      const spent = await coll.findOneAndUpdate(filter, { $inc: { "credits.remaining": -cost, [FENCE]: 1 } }, { returnDocument: "after" });
      if (spent?.credits) return { ok: true, remaining: spent.credits.remaining, refilledAt: spent.credits.refill?.lastRefillAt ?? null };
      // Why not: no such document, moved, unlimited, a refill due, or not enough left.
      const cur = await this.readCredits(ref);
      if (!cur) return hops === 0 ? { ok: true, remaining: null } : { ok: false, remaining: 0 };
      if (cur.creditsKeyId) {
        if (++hops > MAX_CREDIT_HOPS) break;
        current = { keyId: cur.creditsKeyId };
        continue;
      }
      if (!cur.credits) return { ok: true, remaining: null };
      const last = cur.credits.refill?.lastRefillAt;
      if (due && last !== undefined && last < due.periodStart) {
        await coll.updateOne(
          { ...filterOf(ref), "credits.refill.lastRefillAt": last },
          { $set: { "credits.remaining": due.amount, "credits.refill.lastRefillAt": due.periodStart }, $inc: { [FENCE]: 1 } },
        );
        continue;
      }
      if (due && (last === undefined || last >= due.periodStart)) {
        due = null; // refilled already (or no refill rule): retry without the refill condition
        if (cur.credits.remaining >= cost) continue;
      }
      if (cur.credits.remaining < cost) return { ok: false, remaining: cur.credits.remaining };
    }
    throw new UnavailableError("the balance kept changing; retry");
  }

  async touchLastUsed(times: Map<string, number>): Promise<void> {
    if (times.size === 0) return;
    // Not in the key document: a write here can never clobber a concurrent key update.
    if (this.layout === "indexed") {
      await this.run(() =>
        this.activity.bulkWrite(
          [...times].map(([id, t]) => ({ updateOne: { filter: { _id: id }, update: { $max: { lastUsedAt: t } }, upsert: true } })),
          { ordered: false },
        ),
      );
      return;
    }
    // Bucketed: on the key's id pointer, one bucket at a time; a key deleted meanwhile has none and gets none.
    await this.run(async () => {
      for (const group of groupBy([...times], ([id]) => keyIdCollection(id)).values()) {
        await this.keyRefs.keyIdColl(group[0][0])
          .bulkWrite(group.map(([id, t]) => ({ updateOne: { filter: { _id: id }, update: { $max: { lastUsedAt: t } } } })), { ordered: false });
      }
    });
  }

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
    return this.usagePart.writeUsage(rows, batch);
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
}
