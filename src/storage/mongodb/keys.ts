import { UnavailableError } from "../../domain/errors.js";
import type { KeyPatch, KeyRecord } from "../../domain/types.js";
import type { KeyFilter, PageQuery } from "../store.js";
import { FENCE, fenceFilter } from "./lease-lock.js";
import { fromKeyDoc, keyTargets, setOf, toBucketedKeyDoc, toKeyDoc, type FullKeyDoc, type KeyDoc } from "./documents.js";
import { isDuplicateKey } from "./errors.js";
import { hashBucketKey, idBucket, keyIdCollection } from "./ferretdb.js";
import { eachLimited, groupBy } from "./util.js";
import { MAX_CAS_TRIES, type MongoCredits } from "./credits.js";
import type { MongoKeyRefs } from "./key-refs.js";
import type { MongoContext } from "./context.js";

/**
 * Keys, on either key layout (ferretdb.ts; where a key's documents are:
 * key-refs.ts), with their last-used times, kept apart from the key documents.
 *
 * Last-used times on the bucketed layout (FerretDB) are collected in memory and
 * written with every usage roll-up (the store's timer, and at close) into one document per
 * key-id bucket (`key_last_used`, `t.<key id>`, `$max`): one update statement
 * per bucket for however many keys it holds, where a document per key cost one
 * statement per key — on FerretDB each a scan, an update and a commit, a third
 * of its CPU under load (docs/performance.md). Reads in this process see the
 * times not yet written; other processes see them a period later, and a crash
 * loses one period of them (usage counts are not affected).
 */
export class MongoKeys {
  /** Bucketed layout: last-used times not yet written. */
  private pendingLastUsed = new Map<string, number>();
  private lastUsedWrite: Promise<void> = Promise.resolve();

  constructor(
    private readonly ctx: MongoContext,
    private readonly keyRefs: MongoKeyRefs,
    private readonly credits: MongoCredits,
  ) {}

  async createKey(rec: KeyRecord): Promise<void> {
    await this.ctx.run(() => this.insertKey(rec));
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
    if (this.ctx.layout === "indexed") {
      await this.ctx.changing(targets, (o) => this.ctx.keys.insertOne(toKeyDoc(rec), o));
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
      await this.ctx.changing(targets, (o) => this.keyRefs.keyHashColl(rec.hash).insertOne(toBucketedKeyDoc(rec), o));
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
    await this.ctx.run(async () => {
      if (this.ctx.layout === "indexed") {
        for (let i = 0; i < records.length; i += 1000) await this.ctx.keys.insertMany(records.slice(i, i + 1000).map(toKeyDoc));
        return;
      }
      // Buckets written 8 at a time: most of the time here is FerretDB creating thousands of collections.
      await eachLimited([...groupBy(records, (r) => keyIdCollection(r.id)).values()], 8, (group) =>
        // A last-used time goes with the id pointer, where reads find it (a bucketed key document has none).
        this.keyRefs.keyIdColl(group[0].id).insertMany(group.map((r) => ({ _id: r.id, hash: r.hash, ...(r.lastUsedAt !== null ? { lastUsedAt: r.lastUsedAt } : {}) }))),
      );
      await eachLimited([...groupBy(records, (r) => hashBucketKey(r.hash)).values()], 8, (group) =>
        this.keyRefs.keyHashColl(group[0].hash).insertMany(group.map(toBucketedKeyDoc)),
      );
    });
  }

  async getKey(id: string): Promise<KeyRecord | null> {
    const d = await this.ctx.run(async () => this.keyRefs.readKey(await this.keyRefs.keyRef(id)));
    return d ? (await this.withMovedBalances(await this.withLastUsed([fromKeyDoc(d)])))[0] : null;
  }

  /** Adds last-used times, kept apart from key documents (see the class comment). */
  private async withLastUsed(keys: KeyRecord[]): Promise<KeyRecord[]> {
    if (keys.length === 0) return keys;
    const at = new Map<string, number>();
    const later = (id: string, t: number | undefined) => {
      if (t !== undefined && t > (at.get(id) ?? -Infinity)) at.set(id, t);
    };
    await this.ctx.run(async () => {
      if (this.ctx.layout === "indexed") {
        for (const d of await this.ctx.activity.find({ _id: { $in: keys.map((k) => k.id) } }).toArray()) at.set(d._id, d.lastUsedAt);
        return;
      }
      for (const group of groupBy(keys, (k) => keyIdCollection(k.id)).values()) {
        const coll = this.keyRefs.keyIdColl(group[0].id);
        // One id: an `_id` lookup, the one filter FerretDB pushes down. (Times written on the id document by earlier versions.)
        const docs = group.length === 1 ? [await coll.findOne({ _id: group[0].id })].filter((d) => d !== null) : await coll.find({ _id: { $in: group.map((k) => k.id) } }).toArray();
        for (const d of docs) later(d._id, d.lastUsedAt);
      }
      const buckets = [...new Set(keys.map((k) => idBucket(k.id)))];
      const held = buckets.length === 1 ? [await this.ctx.lastUsed.findOne({ _id: buckets[0] })].filter((d) => d !== null) : await this.ctx.lastUsed.find({ _id: { $in: buckets } }).toArray();
      const byBucket = new Map(held.map((d) => [d._id, d]));
      for (const k of keys) later(k.id, byBucket.get(idBucket(k.id))?.t?.[k.id]);
    });
    for (const k of keys) later(k.id, this.pendingLastUsed.get(k.id));
    return keys.map((k) => ({ ...k, lastUsedAt: at.get(k.id) ?? k.lastUsedAt }));
  }

  /** A key whose balance moved by a reroll shows the balance it spends from (none once that key is gone). */
  private async withMovedBalances(keys: KeyRecord[]): Promise<KeyRecord[]> {
    if (!keys.some((k) => k.creditsKeyId)) return keys;
    return Promise.all(
      keys.map(async (k) => {
        if (!k.creditsKeyId) return k;
        const { doc } = await this.credits.balanceHolder({ keyId: k.id });
        return { ...k, credits: doc?.credits ?? { remaining: 0, refill: null } };
      }),
    );
  }

  /** One read: on the bucketed layout an `_id` lookup in one bucket (ferretdb.ts), on the indexed one the hash index. */
  async getKeyByHash(hash: string): Promise<KeyRecord | null> {
    const d = await this.ctx.run(() => (this.ctx.layout === "indexed" ? this.ctx.keys.findOne({ hash }) : this.ctx.buckets.findByHash<KeyDoc>(hash)));
    if (!d) return null;
    const rec = fromKeyDoc(d);
    this.keyRefs.rememberHash(rec.id, rec.hash);
    return (await this.withMovedBalances([rec]))[0];
  }

  async listKeys(filter: KeyFilter, page: PageQuery): Promise<KeyRecord[]> {
    const q: Record<string, unknown> = {};
    if (filter.apiId !== undefined) q.apiId = filter.apiId;
    if (filter.identityId !== undefined) q.identityId = filter.identityId;
    const docs = await this.ctx.run(async () => {
      if (this.ctx.layout === "indexed") return this.ctx.keys.find({ _id: { $gt: page.afterId ?? "" }, ...q }).sort({ _id: 1 }).limit(page.limit).toArray();
      // Every bucket's first page, merged: keys are spread by hash, listed by id.
      const merged: KeyDoc[] = [];
      for (const coll of await this.ctx.buckets.hashBuckets<KeyDoc>()) {
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
    const d = await this.ctx.run(() =>
      this.ctx.locked(`key:${id}`, async () => {
        const ref = await this.keyRefs.keyRef(id);
        const cur = await this.keyRefs.readKey(ref);
        if (!ref || !cur) return null;
        return this.ctx.changing(keyTargets({ id, hash: cur.hash }), (o) => ref.coll.findOneAndUpdate({ _id: ref._id }, update, { returnDocument: "after", ...o }));
      }),
    );
    if (!d) return null;
    return (await this.withMovedBalances(await this.withLastUsed([fromKeyDoc(d)])))[0];
  }

  async deleteKey(id: string): Promise<boolean> {
    const ref = await this.ctx.run(() => this.keyRefs.keyRef(id));
    const cur = await this.ctx.run(() => this.keyRefs.readKey(ref));
    if (!ref || !cur) return false;
    const d = await this.ctx.run(() => this.ctx.changing(keyTargets({ id, hash: cur.hash }), (o) => ref.coll.findOneAndDelete({ _id: ref._id }, o)));
    if (!d) return false;
    this.pendingLastUsed.delete(id);
    await this.ctx.run(() => this.keyRefs.dropKeyPointers([{ id }]));
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
    const withBalanceOf = (o: FullKeyDoc): KeyRecord => (o.creditsKeyId ? { ...base, credits: null, creditsKeyId: o.creditsKeyId } : { ...base, credits: o.credits });
    return this.ctx.run(() =>
      this.ctx.locked(`key:${oldId}`, async () => {
        const ref = await this.keyRefs.keyRef(oldId);
        let old = await this.keyRefs.readKey(ref);
        if (!ref || !old) return null;
        let stored = withBalanceOf(old);
        await this.insertKey(stored);
        const nextRef = this.keyRefs.keyRefOf(next);
        try {
          // The old key's write sits between an intent and a done entry of the change feed, like every key write.
          const gone = await this.ctx.changing(keyTargets({ id: oldId, hash: old.hash }), async (o) => {
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

  async touchLastUsed(times: Map<string, number>): Promise<void> {
    if (times.size === 0) return;
    // Not in the key document: a write here can never clobber a concurrent key update.
    if (this.ctx.layout === "indexed") {
      await this.ctx.run(() =>
        this.ctx.activity.bulkWrite(
          [...times].map(([id, t]) => ({ updateOne: { filter: { _id: id }, update: { $max: { lastUsedAt: t } }, upsert: true } })),
          { ordered: false },
        ),
      );
      return;
    }
    // Bucketed: collected, and written by flushLastUsed (see the class comment).
    this.keepLatest(times);
  }

  /** Adds `times` to those not yet written, keeping each key's latest. */
  private keepLatest(times: Map<string, number>): void {
    for (const [id, t] of times) if (t > (this.pendingLastUsed.get(id) ?? -Infinity)) this.pendingLastUsed.set(id, t);
  }

  /**
   * Writes the collected last-used times: one `$max` statement per key-id
   * bucket, 256 at most. What fails to be written is kept for the next time.
   */
  flushLastUsed(): Promise<void> {
    const run = async () => {
      if (this.pendingLastUsed.size === 0) return;
      const batch = this.pendingLastUsed;
      this.pendingLastUsed = new Map();
      try {
        const ops = [...groupBy([...batch], ([id]) => idBucket(id))].map(([bucket, group]) => ({
          updateOne: { filter: { _id: bucket }, update: { $max: Object.fromEntries(group.map(([id, t]) => [`t.${id}`, t])) }, upsert: true },
        }));
        await this.ctx.run(() => this.ctx.lastUsed.bulkWrite(ops, { ordered: false }));
      } catch (err) {
        this.keepLatest(batch);
        throw err;
      }
    };
    const p = this.lastUsedWrite.then(run, run);
    this.lastUsedWrite = p.catch(() => undefined);
    return p;
  }

  /** Graceful stop: the collected times are written. */
  async close(): Promise<void> {
    await this.flushLastUsed().catch(() => undefined);
  }
}
