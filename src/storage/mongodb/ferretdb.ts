import { createHash } from "node:crypto";
import type { Collection, Db, Document, MongoClient } from "mongodb";

/*
 * Where key documents live on MongoDB (docs/storage-layout.md).
 *
 * "indexed" (MongoDB proper): one `keys` collection, `_id` = key id, a unique
 * index on `hash`; last-used times in `key_activity`. Every lookup is an index
 * lookup.
 *
 * "bucketed" (FerretDB 1.x): FerretDB uses no index for reading: it pushes down
 * only a filter that is exactly `{_id: <string>}`, and answers even that by
 * scanning the collection's SQLite table, parsing every document's JSON (a few
 * µs each); any other filter is a scan decoded in Go, ten times dearer. A
 * lookup costs what its collection holds, so keys are spread over small
 * collections and every hot read is an `_id` lookup in one of them:
 *
 * - key documents by hash: `_id` = the key's hash, `keyId` = its id. Bucket =
 *   the hash's first three hex digits (12 bits, 4,096 buckets): the high six
 *   bits name the companion database `<db>_kh<xx>`, the low six the collection
 *   `h<xx>` in it (64 databases of 64 collections).
 *   A verification's lookup by hash reads one bucket (about 25 keys of
 *   100,000). The `_id` makes the hash unique: two keys with one hash fall
 *   into one bucket under one `_id`.
 * - key ids: `{_id: <key id>, hash, lastUsedAt}` in collection `i<dd>` of
 *   `<db>_ki`, `dd` from the SHA-256 of the id (256 buckets of small
 *   documents): how a key is found by id (GetKey, updates, spends), and when it
 *   was last used. A key's hash never changes, so this pointer is written once,
 *   before the key, and removed after it.
 *
 * Companion databases, not collections of the main one: FerretDB lists (copies
 * and sorts) every collection of a database for every query it answers, about
 * 1 µs each, so thousands of buckets in one database would slow every query of
 * it; with 256 buckets a database, that listing was a quarter of FerretDB's CPU
 * for a cold lookup (docs/performance.md), hence 64.
 */

export type KeyLayout = "indexed" | "bucketed";

/** Hex digits of the hash a key bucket is chosen by (one for the database, two for the collection). */
export const KEY_BUCKET_HEX = 3;
/** Hex digits of an id's SHA-256 its pointer's bucket is chosen by. */
export const ID_BUCKET_HEX = 2;

const HEX3 = /^[0-9a-f]{3}/;

function sha256Hex(s: string): string {
  return createHash("sha256").update(s).digest("hex");
}

/** The hex digits a hash is bucketed by (a key hash is hex SHA-256; anything else is hashed first). */
export function hashBucket(hash: string): string {
  return (HEX3.test(hash) ? hash : sha256Hex(hash)).slice(0, KEY_BUCKET_HEX);
}

/** The bucket of a key id: the first hex digits of its SHA-256 (ids begin with their creation time). */
export function idBucket(id: string): string {
  return sha256Hex(id).slice(0, ID_BUCKET_HEX);
}

/** Key-hash buckets a companion database holds (and companion databases of key hashes). */
export const KEY_BUCKETS_PER_DATABASE = 64;
const hex2 = (n: number) => n.toString(16).padStart(2, "0");

/** The companion database (suffix) and collection of the key with this hash. */
export function keyHashLocation(hash: string): { suffix: string; collection: string } {
  const n = parseInt(hashBucket(hash), 16);
  return { suffix: `kh${hex2(Math.floor(n / KEY_BUCKETS_PER_DATABASE))}`, collection: `h${hex2(n % KEY_BUCKETS_PER_DATABASE)}` };
}

/** The collection of the key-id pointer of this key, in companion database `ki`. */
export const keyIdCollection = (id: string) => `i${idBucket(id)}`;

const KEY_HASH_SUFFIXES = Array.from({ length: 16 ** KEY_BUCKET_HEX / KEY_BUCKETS_PER_DATABASE }, (_, i) => `kh${hex2(i)}`);

/**
 * The name of a companion database of `database` (FerretDB allows 63
 * characters of `[A-Za-z0-9_-]`): `<database>_<suffix>`, or, when that is too
 * long, the database's name shortened and told apart by a hash of it.
 */
export function companionDatabase(database: string, suffix: string): string {
  const name = `${database}_${suffix}`;
  if (name.length <= 63) return name;
  return `${database.slice(0, 63 - suffix.length - 10)}_${sha256Hex(database).slice(0, 8)}_${suffix}`;
}

/** Every database a store on `database` may write, the companions included (for dropping them all). */
export function storeDatabases(database: string): string[] {
  return [database, ...KEY_HASH_SUFFIXES.map((s) => companionDatabase(database, s)), companionDatabase(database, "ki")];
}

/** The bucketed layout's collections, for a store on `database`. */
export function createKeyBuckets(client: MongoClient, database: string) {
  const hashDbs = new Map<string, Db>(KEY_HASH_SUFFIXES.map((s) => [s, client.db(companionDatabase(database, s))]));
  const idDb = client.db(companionDatabase(database, "ki"));
  // Collection objects made once per bucket (the driver builds one per `collection()` call).
  const made = new Map<string, Collection<Document>>();
  const collectionOf = (db: Db, name: string): Collection<Document> => {
    const k = `${db.databaseName}/${name}`;
    let c = made.get(k);
    if (!c) made.set(k, (c = db.collection(name)));
    return c;
  };
  return {
    /** The bucket holding the key document with this hash. */
    byHash<T extends Document>(hash: string): Collection<T> {
      const { suffix, collection } = keyHashLocation(hash);
      return collectionOf(hashDbs.get(suffix)!, collection) as unknown as Collection<T>;
    },
    /**
     * The key document with this hash, or null: one `find` command with the
     * `_id` filter FerretDB pushes down. Sent as a command rather than through
     * `findOne`, which builds a cursor around the same command (its client-side
     * cost per cold lookup: docs/performance.md, step 8g).
     */
    async findByHash<T extends Document>(hash: string): Promise<T | null> {
      const { suffix, collection } = keyHashLocation(hash);
      const res = await hashDbs.get(suffix)!.command({ find: collection, filter: { _id: hash }, limit: 1, singleBatch: true, batchSize: 1 });
      return ((res.cursor as { firstBatch?: T[] } | undefined)?.firstBatch?.[0] ?? null) as T | null;
    },
    /** The bucket holding the id pointer of the key with this id. */
    byId<T extends Document>(id: string): Collection<T> {
      return collectionOf(idDb, keyIdCollection(id)) as unknown as Collection<T>;
    },
    /** The key-document buckets that exist (for reads by anything but the hash). */
    async hashBuckets<T extends Document>(): Promise<Collection<T>[]> {
      const out: Collection<T>[] = [];
      for (const db of hashDbs.values()) {
        const names = await db.listCollections({ name: { $regex: "^h[0-9a-f]{2}$" } }, { nameOnly: true }).toArray();
        for (const n of names.map((c) => c.name).sort()) out.push(db.collection<T>(n));
      }
      return out;
    },
  };
}

export type KeyBuckets = ReturnType<typeof createKeyBuckets>;

/*
 * The store's other FerretDB workarounds, chosen by `init` (context.ts) from
 * what the server says it is. Each says which MongoDB guarantee the other path
 * relies on.
 */

/** The server: FerretDB names its version in buildInfo. */
export function serverFlavor(buildInfo: Record<string, unknown>): "mongodb" | "ferretdb" {
  return "ferretdbVersion" in buildInfo ? "ferretdb" : "mongodb";
}

/**
 * How credits are written unless the options say (MongoStoreOptions.creditWrites).
 * FerretDB 1.x applies every update as a read followed by a whole-document
 * write, so two concurrent updates of one document can lose one: there a
 * balance is read and written back (fenced) under its one-writer lease lock
 * (lease-lock.ts). "conditional" (`remaining ≥ cost` in the filter, `$inc` in
 * the update, no lock) relies on MongoDB applying a single-document update
 * with its filter atomically.
 */
export function defaultCreditWrites(flavor: "mongodb" | "ferretdb"): "conditional" | "locked" {
  return flavor === "ferretdb" ? "locked" : "conditional";
}

/**
 * The key layout of a database that has recorded none (see the top of this
 * file): bucketed on FerretDB, which pushes down only `_id` lookups; "indexed"
 * relies on MongoDB answering a lookup by `hash` from its unique index.
 */
export function defaultKeyLayout(flavor: "mongodb" | "ferretdb"): KeyLayout {
  return flavor === "ferretdb" ? "bucketed" : "indexed";
}

/**
 * Seqs per change feed collection (`change_feed_<seq / bucket>`, see FeedDoc
 * in documents.ts). FerretDB answers even an `_id` lookup by scanning its
 * table, so there buckets are small (500) and a lookup costs at most one
 * bucket whatever the history; pruning drops whole collections instead of
 * deleting documents (which FerretDB does by reading every document of the
 * collection). MongoDB's `_id` index needs no such help: 100,000 a bucket.
 */
export function feedBucketSize(flavor: "mongodb" | "ferretdb"): number {
  return flavor === "ferretdb" ? 500 : 100_000;
}

/** Change feed collections are named this and their bucket's number. */
export const FEED_PREFIX = "change_feed_";

/** The name of the change feed collection holding `seq`, with `bucket` seqs a collection. */
export function feedCollection(seq: number, bucket: number): string {
  return `${FEED_PREFIX}${Math.floor(seq / bucket)}`;
}

/** Keys in one bucket of the bucketed layout have equal values of this. */
export const hashBucketKey = (hash: string) => {
  const l = keyHashLocation(hash);
  return `${l.suffix}/${l.collection}`;
};

/** Bucketed layout: most key ids whose hash a store remembers. */
export const HASH_OF_ID_MAX = 100_000;
