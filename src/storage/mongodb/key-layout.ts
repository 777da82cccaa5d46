import { createHash } from "node:crypto";
import type { Db } from "mongodb";

/*
 * Where key documents live on MongoDB (docs/storage-layout.md).
 *
 * "indexed" (MongoDB proper): one `keys` collection, `_id` = key id, a unique
 * index on `hash`; last-used times in `key_activity`. Every lookup is an index
 * lookup.
 *
 * "bucketed" (FerretDB 1.x): FerretDB uses no index for reading: it pushes down
 * only a filter that is exactly `{_id: <string>}`, and answers even that by
 * scanning the SQLite table (decoding every document's JSON); any other filter
 * is a scan decoded in Go, ten times dearer per document. A lookup therefore
 * costs what the collection holds, so documents are spread over small
 * collections and every hot read is an `_id` lookup in one of them:
 *
 * - key documents by hash: `_id` = the key's hash, in collection `h<xx>` of the
 *   companion database `<db>_kh`, `xx` the hash's first two hex digits (256
 *   buckets). A verification's lookup by hash reads one bucket. The `_id`
 *   makes the hash unique: two keys with one hash fall into one bucket under
 *   one `_id`.
 * - key ids: `{_id: <key id>, hash, lastUsedAt}` in collection `i<xx>` of
 *   `<db>_ki`, `xx` from the SHA-256 of the id: how a key is found by id
 *   (GetKey, updates, spends), and its last-used time. A key's hash never
 *   changes, so this pointer is written once, before the key, and removed after it.
 *
 * Companion databases, not collections of the main one: FerretDB lists every
 * collection of a database for every query it answers (about 1 µs each), so
 * 512 buckets there would slow every query of the main database.
 */

export type KeyLayout = "indexed" | "bucketed";

/** Buckets per family: 256 (two hex digits). Recorded with the layout, so a later version can tell. */
export const BUCKET_HEX = 2;

const HEX = /^[0-9a-f]+$/;

/** The two hex digits a hash is bucketed by (a hash is hex SHA-256; anything else is hashed first). */
export function hashBucket(hash: string): string {
  const head = hash.slice(0, BUCKET_HEX);
  return head.length === BUCKET_HEX && HEX.test(head) ? head : sha256Hex(hash).slice(0, BUCKET_HEX);
}

/** The bucket of a key id: the first hex digits of its SHA-256 (ids begin with their creation time). */
export function idBucket(id: string): string {
  return sha256Hex(id).slice(0, BUCKET_HEX);
}

function sha256Hex(s: string): string {
  return createHash("sha256").update(s).digest("hex");
}

/** Collection names in the companion databases. */
export const keyHashCollection = (hash: string) => `h${hashBucket(hash)}`;
export const keyIdCollection = (id: string) => `i${idBucket(id)}`;

/**
 * The name of a companion database of `database` (FerretDB allows 63
 * characters of `[A-Za-z0-9_-]`): `<database>_<suffix>`, or, when that is too
 * long, the database's name shortened and told apart by a hash of it.
 */
export function companionDatabase(database: string, suffix: "kh" | "ki"): string {
  const name = `${database}_${suffix}`;
  if (name.length <= 63) return name;
  return `${database.slice(0, 63 - suffix.length - 10)}_${sha256Hex(database).slice(0, 8)}_${suffix}`;
}

/** The bucket collections of a companion database that exist (names starting with `prefix`). */
export async function bucketCollections(db: Db, prefix: "h" | "i"): Promise<string[]> {
  const names = await db.listCollections({ name: { $regex: `^${prefix}[0-9a-f]{${BUCKET_HEX}}$` } }, { nameOnly: true }).toArray();
  return names.map((c) => c.name).sort();
}

/** Every database a store on `database` may write, the companions included (for dropping them all). */
export function storeDatabases(database: string): string[] {
  return [database, companionDatabase(database, "kh"), companionDatabase(database, "ki")];
}
