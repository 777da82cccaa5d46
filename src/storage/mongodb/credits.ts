import type { Collection } from "mongodb";
import { FailedPreconditionError, UnavailableError } from "../../domain/errors.js";
import type { Credits, CreditsOp, CreditsTarget } from "../../domain/types.js";
import { applyCreditsOp, applyDueRefill, spendFromBalance } from "../../domain/credits.js";
import { abortSignalOf, type CommitSignal, type RefillDue, type SpendResult } from "../store.js";
import { FENCE, fenceFilter } from "./lease-lock.js";
import { identityTargets, keyTargets, type CreditsDoc } from "./documents.js";
import type { MongoKeyRefs } from "./key-refs.js";
import type { MongoContext } from "./context.js";

/** A spend waiting for its balance's lock (see MongoCredits.spendLocked). */
type PendingSpend = {
  cost: number;
  refill: RefillDue | null;
  signal?: AbortSignal;
  resolve: (r: SpendResult) => void;
  reject: (err: unknown) => void;
};

/** How many reroll moves a key's balance is followed through. */
export const MAX_CREDIT_HOPS = 8;
/** How often a conditional credit write is tried again after a concurrent write changed its document. */
export const MAX_CAS_TRIES = 20;
/**
 * A filter for a balance's document beside other conditions: on the bucketed
 * layout also its key id (`_id` is the hash, see MongoKeyRefs.readKey).
 */
const filterOf = (ref: { id: string; keyId?: string }): Record<string, unknown> => (ref.keyId && ref.keyId !== ref.id ? { _id: ref.id, keyId: ref.keyId } : { _id: ref.id });
/** The lease lock of a balance's document. */
const lockOf = (target: CreditsTarget) => ("keyId" in target ? `key:${target.keyId}` : `identity:${target.identityId}`);

/**
 * Balances of keys and identities: "locked" (lease lock, fenced writes, spends
 * of one balance batched) or "conditional" (one conditional update per spend,
 * compare-and-set otherwise) — see MongoStoreOptions.creditWrites and
 * defaultCreditWrites in ferretdb.ts.
 */
export class MongoCredits {
  constructor(
    private readonly ctx: MongoContext,
    private readonly keyRefs: MongoKeyRefs,
  ) {}

  /**
   * The document holding `target`'s own balance: its collection, `_id` and lock.
   * Null for a key that does not exist (bucketed layout: no id pointer).
   */
  private async creditsRef(target: CreditsTarget): Promise<{ coll: Collection<CreditsDoc>; id: string; lock: string; keyId?: string } | null> {
    if (!("keyId" in target)) return { coll: this.ctx.identities as unknown as Collection<CreditsDoc>, id: target.identityId, lock: `identity:${target.identityId}` };
    const ref = await this.keyRefs.keyRef(target.keyId);
    if (!ref) return null;
    return { coll: ref.coll as unknown as Collection<CreditsDoc>, id: ref._id, lock: `key:${target.keyId}`, keyId: target.keyId };
  }

  /** The document of a credits ref (null when there is none, or its `_id` now holds another key). */
  private async readCredits(ref: { coll: Collection<CreditsDoc>; id: string; keyId?: string } | null): Promise<CreditsDoc | null> {
    if (!ref) return null;
    const d = await ref.coll.findOne({ _id: ref.id });
    if (!d || (ref.keyId && (d.keyId ?? d._id) !== ref.keyId)) return null;
    // A slim bucketed key document (toBucketedKeyDoc) has no `credits` when it has no balance, and its hash is its `_id`.
    return { ...d, credits: d.credits ?? null, hash: d.hash ?? (d.keyId !== undefined ? d._id : undefined) };
  }

  /**
   * The document holding the balance of `target`: for a key, itself or the key
   * its balance moved to by a reroll (followed through a chain). `gone` when the
   * balance moved to a key that no longer exists; `doc` null when the target
   * does not exist.
   */
  async balanceHolder(target: CreditsTarget): Promise<{ target: CreditsTarget; doc: CreditsDoc | null; gone: boolean }> {
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
        const res = opts.record ? await this.ctx.changing(targets, write) : await write();
        if (res.matchedCount === 1) return { result, doc: cur };
        if (this.ctx.creditWrites === "locked") throw new UnavailableError(`lost the lock on ${lock} while writing; nothing written`);
        return "retry" as const;
      };
      const out = this.ctx.creditWrites === "locked" ? await this.ctx.locked(lock, attempt) : await attempt();
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
    return this.ctx.run(async () => {
      if (this.ctx.creditWrites === "conditional") return this.updateConditionally(target, op, now, refill);
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

  /**
   * MongoDB: UpdateCredits without a compare-and-set on the write counter,
   * which every spend moves — so a balance spent from all the time can still
   * be updated. The write pins only what its result depends on besides spends:
   * that the balance is still here (not moved, limited or not as read) and its
   * refill rule and refill time as read. A set, or an update that applies a due
   * refill, writes the whole balance (spends before it are overwritten, as the
   * operation says); an increment or a decrement leaves the arithmetic to the
   * server (`$inc`), with the side of its bound in the filter (a decrement
   * stops at zero, an increment at MAX_SAFE_INTEGER), so spends landing between
   * the read and the write all count. It misses only when the balance crossed
   * that bound, was refilled or moved meanwhile, and then reads again. Relies,
   * like spendConditionally, on MongoDB applying a single document's update
   * with its filter atomically; on FerretDB it runs with one writer only.
   */
  private async updateConditionally(target: CreditsTarget, op: CreditsOp, now: number, refill: RefillDue | null): Promise<Credits | null | undefined> {
    let current = target;
    for (let tries = 0, hops = 0; tries < MAX_CAS_TRIES; tries++) {
      const ref = await this.creditsRef(current);
      const cur = await this.readCredits(ref);
      if (!ref || !cur) {
        if (hops === 0) return undefined;
        throw new FailedPreconditionError("this key's balance moved to a key that was deleted");
      }
      if (cur.creditsKeyId) {
        if (++hops > MAX_CREDIT_HOPS) throw new FailedPreconditionError("this key's balance moved to a key that was deleted");
        current = { keyId: cur.creditsKeyId };
        continue;
      }
      const next = applyCreditsOp(cur.credits, op, refill); // throws for an increment of an unlimited balance
      const filter: Record<string, unknown> = { ...filterOf(ref), creditsKeyId: null };
      if (cur.credits === null) filter.credits = null;
      else if (cur.credits.refill === null) filter["credits.refill"] = null;
      // Field by field: an embedded document's equality would also compare the order of its fields.
      else for (const [f, v] of Object.entries(cur.credits.refill)) filter[`credits.refill.${f}`] = v;
      let update: Record<string, unknown>;
      const relative = cur.credits !== null && op.op !== "set" && !applyDueRefill(cur.credits, refill).changed;
      if (!relative) {
        if (cur.credits !== null) filter.credits = { $ne: null };
        update = { $set: { credits: next, updatedAt: now } };
      } else {
        const remaining = cur.credits!.remaining;
        const n = op.value as number;
        const field = "credits.remaining";
        if (op.op === "increment") {
          const room = Number.MAX_SAFE_INTEGER - n;
          filter[field] = remaining <= room ? { $lte: room } : { $gt: room };
          update = remaining <= room ? { $inc: { [field]: n }, $set: { updatedAt: now } } : { $set: { [field]: Number.MAX_SAFE_INTEGER, updatedAt: now } };
        } else {
          filter[field] = remaining >= n ? { $gte: n } : { $lt: n };
          update = remaining >= n ? { $inc: { [field]: -n }, $set: { updatedAt: now } } : { $set: { [field]: 0, updatedAt: now } };
        }
      }
      update.$inc = { ...(update.$inc as object | undefined), version: 1, [FENCE]: 1 };
      const targets = "keyId" in current ? keyTargets({ id: current.keyId, hash: cur.hash! }) : identityTargets(ref.id);
      const after = await this.ctx.changing(targets, (o) => ref.coll.findOneAndUpdate(filter, update, { returnDocument: "after", ...o }));
      if (after) return after.credits ?? null;
    }
    throw new UnavailableError("the balance kept changing; retry");
  }

  async spendCredits(target: CreditsTarget, cost: number, refill: RefillDue | null, signal?: CommitSignal): Promise<SpendResult> {
    return this.ctx.run(() =>
      // A spend that queues for the lock is told when its call ends: that needs an AbortSignal.
      this.ctx.creditWrites === "conditional" ? this.spendConditionally(target, cost, refill, signal) : this.spendLocked(target, { cost, refill, signal: abortSignalOf(signal) }),
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
    if (queued && queued.length >= (this.ctx.opts.lock?.queueMax ?? 64) * 16) {
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
        const moved = await this.ctx.locked(lock, async () => {
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
    if (this.ctx.creditWrites === "locked") {
      const out = await this.ctx.run(() =>
        this.rmwCredits(target, (doc) => {
          if (!samePeriod(doc.credits)) return { credits: doc.credits, result: false };
          return { credits: { ...doc.credits!, remaining: doc.credits!.remaining + cost }, result: true };
        }),
      );
      return typeof out === "object" && out.result;
    }
    // MongoDB: one conditional $inc, on the holder of the balance.
    return this.ctx.run(async () => {
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
    const d = await this.ctx.run(async () => this.readCredits(await this.creditsRef(target)));
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
      const res = opts.recordChange ? await this.ctx.changing(targets, write) : await write();
      if (res.matchedCount === 1) return { hash: cur.hash ?? null };
      if (this.ctx.creditWrites === "locked") throw new UnavailableError(`lost the lock on ${lock} while writing; nothing written`);
      return "retry" as const;
    };
    return this.ctx.run(async () => {
      for (let tries = 0; tries < MAX_CAS_TRIES; tries++) {
        const out = this.ctx.creditWrites === "locked" ? await this.ctx.locked(lock, attempt) : await attempt();
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
  private async spendConditionally(target: CreditsTarget, cost: number, refill: RefillDue | null, signal?: CommitSignal): Promise<SpendResult> {
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
}
