import type { Collection } from "mongodb";
import { fullKeyDoc, type FullKeyDoc, type KeyDoc, type KeyIdDoc, type KeyRef } from "./documents.js";
import { groupBy } from "./util.js";
import { HASH_OF_ID_MAX, hashBucketKey, idBucket, keyIdCollection } from "./ferretdb.js";
import type { MongoContext } from "./context.js";

/**
 * Where a key's documents are, on either key layout (ferretdb.ts): its
 * document by id or by hash, the keys matching a filter, and removing them.
 * Used by the keys, identities and credits parts.
 */
export class MongoKeyRefs {
  /**
   * Bucketed layout: hashes of key ids seen (a key's hash never changes), so
   * that finding a key by id (a spend, an update) needs no read of its pointer.
   */
  private readonly hashOfId = new Map<string, string>();

  constructor(private readonly ctx: MongoContext) {}

  /** Bucketed layout: the bucket holding the key with this hash. */
  keyHashColl(hash: string): Collection<KeyDoc> {
    return this.ctx.buckets.byHash<KeyDoc>(hash);
  }

  /** Bucketed layout: the bucket holding the id pointer (and last-used time) of this key. */
  keyIdColl(id: string): Collection<KeyIdDoc> {
    return this.ctx.buckets.byId<KeyIdDoc>(id);
  }

  rememberHash(id: string, hash: string): void {
    if (this.ctx.layout !== "bucketed") return;
    if (this.hashOfId.size >= HASH_OF_ID_MAX) this.hashOfId.delete(this.hashOfId.keys().next().value!);
    this.hashOfId.set(id, hash);
  }

  /** Where a key whose id and hash are known is. */
  keyRefOf(k: { id: string; hash: string }): KeyRef {
    return this.ctx.layout === "indexed" ? { coll: this.ctx.keys, _id: k.id, id: k.id } : { coll: this.keyHashColl(k.hash), _id: k.hash, id: k.id };
  }

  /** Where the key with this id is; null when there is none (bucketed layout: no id pointer). */
  async keyRef(id: string): Promise<KeyRef | null> {
    if (this.ctx.layout === "indexed") return { coll: this.ctx.keys, _id: id, id };
    let hash = this.hashOfId.get(id);
    if (hash === undefined) {
      const p = await this.keyIdColl(id).findOne({ _id: id });
      if (!p?.hash) return null;
      hash = p.hash;
      this.rememberHash(id, hash);
    }
    return { coll: this.keyHashColl(hash), _id: hash, id };
  }

  /**
   * The document `ref` points at, if it is that key's. (On the bucketed layout
   * `_id` is the hash: after a key is deleted, its hash could be another key's,
   * so the id is checked.)
   */
  async readKey(ref: KeyRef | null): Promise<FullKeyDoc | null> {
    if (!ref) return null;
    const d = await ref.coll.findOne({ _id: ref._id });
    return d && (d.keyId ?? d._id) === ref.id ? fullKeyDoc(d) : null;
  }

  /**
   * Ids and hashes of the keys matching `filter` (any field but the id). On the
   * bucketed layout every bucket is read: FerretDB filters anything but `_id` by
   * reading the whole collection anyway.
   */
  async findKeys(filter: Record<string, unknown>): Promise<{ id: string; hash: string }[]> {
    if (this.ctx.layout === "indexed") {
      // Indexed documents always hold their hash (its unique index).
      const docs = await this.ctx.keys.find(filter, { projection: { _id: 1, hash: 1 } }).toArray();
      return docs.map((d) => ({ id: d._id, hash: d.hash! }));
    }
    const out: { id: string; hash: string }[] = [];
    for (const coll of await this.ctx.buckets.hashBuckets<KeyDoc>()) {
      const docs = await coll.find(filter, { projection: { _id: 1, keyId: 1 } }).toArray();
      for (const d of docs) out.push({ id: d.keyId!, hash: d._id });
    }
    return out;
  }

  /** Deletes the documents of `keys` that still match `filter`; returns how many went. */
  async deleteKeyDocs(keys: { id: string; hash: string }[], filter: Record<string, unknown>, o: { maxTimeMS?: number }): Promise<number> {
    if (this.ctx.layout === "indexed") return (await this.ctx.keys.deleteMany({ _id: { $in: keys.map((k) => k.id) }, ...filter }, o)).deletedCount;
    let n = 0;
    for (const group of groupBy(keys, (k) => hashBucketKey(k.hash)).values()) {
      const coll = this.keyHashColl(group[0].hash);
      n += (await coll.deleteMany({ _id: { $in: group.map((k) => k.hash) }, keyId: { $in: group.map((k) => k.id) }, ...filter }, o)).deletedCount;
    }
    return n;
  }

  /** Removes what finds keys by id once their documents are gone: id pointers (bucketed) or last-used times (indexed). */
  async dropKeyPointers(keys: { id: string }[]): Promise<void> {
    if (this.ctx.layout === "indexed") {
      await this.ctx.activity.deleteMany({ _id: { $in: keys.map((k) => k.id) } });
      return;
    }
    for (const group of groupBy(keys, (k) => keyIdCollection(k.id)).values()) {
      await this.keyIdColl(group[0].id).deleteMany({ _id: { $in: group.map((k) => k.id) } });
    }
    // Their last-used times (keys.ts), one statement per id bucket: deleted keys do not pile up there.
    const ops = [...groupBy(keys, (k) => idBucket(k.id))].map(([bucket, group]) => ({
      updateOne: { filter: { _id: bucket }, update: { $unset: Object.fromEntries(group.map((k) => [`t.${k.id}`, "" as const])) } },
    }));
    if (ops.length > 0) await this.ctx.lastUsed.bulkWrite(ops, { ordered: false });
  }
}
