/**
 * A key's stored document read straight from MongoDB, whichever layout the
 * database uses (docs/storage-layout.md): `keys` (indexed, MongoDB proper), or
 * the key's hash bucket found through its id pointer (bucketed, FerretDB).
 * For tests that check what a server left in the store after it stopped.
 */
import type { MongoClient } from "mongodb";
import { createKeyBuckets } from "../../src/storage/mongodb/key-layout.js";

export async function storedKeyDoc<T extends { _id: string }>(client: MongoClient, database: string, id: string): Promise<T | null> {
  const indexed = await client.db(database).collection<T>("keys").findOne({ _id: id } as never);
  if (indexed) return indexed as T;
  const buckets = createKeyBuckets(client, database);
  const pointer = await buckets.byId<{ _id: string; hash: string }>(id).findOne({ _id: id });
  return pointer && ((await buckets.byHash<T>(pointer.hash).findOne({ _id: pointer.hash } as never)) as T | null);
}
