import { MongoServerError, type Collection, type Db } from "mongodb";

/** A document with a string `_id` (every collection here). */
type Document = { _id: string; [field: string]: unknown };
import { UnavailableError } from "../../domain/errors.js";
import { groupBy } from "./util.js";
import { ID_BUCKET_HEX, KEY_BUCKET_HEX, KEY_BUCKETS_PER_DATABASE, keyHashLocation, keyIdCollection, type KeyBuckets, type KeyLayout } from "./ferretdb.js";

/*
 * Moving a database written by an earlier version (keys in one `keys`
 * collection, last-used times in `key_activity`, root keys found by their
 * `hash` field) to the bucketed layout of ferretdb.ts, at start, before the
 * store serves anything. docs/storage-layout.md has the steps and the reasons.
 *
 * Idempotent and resumable: every step either finds its work done or redoes it
 * with the same result — a key document is copied to `_id` = its hash (a copy
 * that exists is checked to be the same key, never overwritten), its id pointer
 * likewise — and the old collections are dropped only after everything in them
 * was copied. Instances starting together take turns under one lease lock.
 */

/** The settings document recording the layout a database uses. */
export const LAYOUT_SETTING = "storage_layout";

/**
 * Documents kept in the old `keys` collection after the move, with a unique
 * index on `enabled`: every key document has `enabled` true or false, so an
 * instance of an earlier version cannot insert a key there (duplicate key) and
 * finds none there — it fails closed instead of serving keys apart from this
 * one. (On MongoDB proper its unique hash index cannot even be built.)
 */
const FENCE_IDS = ["~moved-to-bucketed-layout-0", "~moved-to-bucketed-layout-1"];
const FENCE_INDEX = "moved_to_bucketed_layout";

/** Keys copied per batch. */
const BATCH = 500;

function isDuplicate(err: unknown): boolean {
  return err instanceof MongoServerError && (err.code === 11000 || (err.code === 1 && /UNIQUE constraint failed/.test(err.message)));
}

function isNamespaceMissing(err: unknown): boolean {
  return err instanceof MongoServerError && (err.code === 26 || /not found/i.test(err.message));
}

/** The layout recorded for this database, or null when none is (a new database, or one written by an earlier version). */
export async function readLayout(settings: Collection<{ _id: string; value: string }>): Promise<KeyLayout | null> {
  const d = await settings.findOne({ _id: LAYOUT_SETTING });
  if (!d) return null;
  const v = JSON.parse(d.value) as { keys: KeyLayout; keyBucketHex?: number; keyBucketsPerDatabase?: number; idBucketHex?: number };
  if (v.keys === "bucketed" && (v.keyBucketHex !== KEY_BUCKET_HEX || v.keyBucketsPerDatabase !== KEY_BUCKETS_PER_DATABASE || v.idBucketHex !== ID_BUCKET_HEX)) {
    throw new Error(
      `this database's keys are in ${16 ** (v.keyBucketHex ?? 0)} buckets, ${v.keyBucketsPerDatabase ?? "?"} a database; this version reads ${16 ** KEY_BUCKET_HEX}, ${KEY_BUCKETS_PER_DATABASE} a database`,
    );
  }
  return v.keys;
}

/**
 * Records `layout` unless another instance recorded one first; returns the
 * layout recorded.
 */
export async function recordLayout(settings: Collection<{ _id: string; value: string }>, layout: KeyLayout): Promise<KeyLayout> {
  try {
    const buckets = layout === "bucketed" ? { keyBucketHex: KEY_BUCKET_HEX, keyBucketsPerDatabase: KEY_BUCKETS_PER_DATABASE, idBucketHex: ID_BUCKET_HEX } : {};
    await settings.insertOne({ _id: LAYOUT_SETTING, value: JSON.stringify({ keys: layout, ...buckets }) });
    return layout;
  } catch (err) {
    if (!isDuplicate(err)) throw err;
    return (await readLayout(settings))!;
  }
}

export interface MigrationContext {
  db: Db;
  buckets: KeyBuckets;
  /** Runs `fn` under the store's lease lock `name` (lease-lock.ts). */
  locked<T>(name: string, fn: () => Promise<T>): Promise<T>;
  /** Tests: called after each batch of keys copied (the count so far); throwing stops the migration there, as a crash would. */
  afterBatch?: (copied: number) => void | Promise<void>;
  /** Keys copied per batch (default BATCH). */
  batch?: number;
  /** How long to wait for another instance's migration (default 10 min). */
  waitMs?: number;
}

/** What one run moved (all zero when there was nothing left to move). */
export interface MigrationReport {
  keys: number;
  rootKeys: number;
}

/**
 * Moves whatever is still in the old shape to the bucketed layout (nothing to
 * do is the common case: a few reads). Serialised across instances by the lease
 * lock; an instance that finds the lock held waits for it.
 */
export async function settleBucketedLayout(ctx: MigrationContext): Promise<MigrationReport> {
  const deadline = Date.now() + (ctx.waitMs ?? 600_000);
  for (;;) {
    try {
      return await ctx.locked("layout:migration", () => migrate(ctx));
    } catch (err) {
      // Another instance holds the lock (it is migrating): wait for it.
      if (!(err instanceof UnavailableError) || Date.now() > deadline) throw err;
    }
  }
}

async function migrate(ctx: MigrationContext): Promise<MigrationReport> {
  const legacy = ctx.db.collection<Document>("keys");
  const activity = ctx.db.collection<{ _id: string; lastUsedAt: number }>("key_activity");
  let keys = 0;
  if (await legacy.findOne({ _id: { $nin: FENCE_IDS } }, { projection: { _id: 1 } })) {
    const lastUsed = new Map<string, number>();
    for await (const a of activity.find({})) lastUsed.set(a._id, a.lastUsedAt);
    const size = ctx.batch ?? BATCH;
    const cursor = legacy.find({ _id: { $nin: FENCE_IDS } }, { batchSize: size });
    let batch: Document[] = [];
    const flush = async () => {
      await copyKeys(ctx, batch, lastUsed);
      keys += batch.length;
      batch = [];
      await ctx.afterBatch?.(keys);
    };
    for await (const d of cursor) {
      batch.push(d);
      if (batch.length >= size) await flush();
    }
    if (batch.length > 0) await flush();
    // Everything is copied: only now does the old collection go.
    await legacy.drop().catch((err: unknown) => {
      if (!isNamespaceMissing(err)) throw err;
    });
  }
  await fence(legacy);
  await activity.drop().catch((err: unknown) => {
    if (!isNamespaceMissing(err)) throw err;
  });
  const rootKeys = await pointRootKeys(ctx.db);
  return { keys, rootKeys };
}

/** Copies old key documents to their buckets, with their id pointers (and last-used times). */
async function copyKeys(ctx: MigrationContext, docs: Document[], lastUsed: Map<string, number>): Promise<void> {
  const pointers = groupBy(
    docs.map((d) => ({ _id: d._id, hash: d.hash as string, ...(lastUsed.has(d._id) ? { lastUsedAt: lastUsed.get(d._id)! } : {}) })),
    (p) => keyIdCollection(p._id),
  );
  for (const group of pointers.values()) {
    await insertKeepingExisting(ctx.buckets.byId<Document>(group[0]._id), group, (existing, doc) => existing.hash === doc.hash, "key id");
  }
  const moved = groupBy(
    docs.map((d) => ({ ...d, _id: d.hash as string, keyId: d._id })),
    (d) => {
      const l = keyHashLocation(d._id);
      return `${l.suffix}/${l.collection}`;
    },
  );
  for (const group of moved.values()) {
    await insertKeepingExisting(ctx.buckets.byHash<Document>(group[0]._id), group, (existing, doc) => existing.keyId === doc.keyId, "key hash");
  }
}

/**
 * Inserts `docs`; a document whose `_id` exists already is kept as it is when
 * `same` says it is this one (copied by an earlier run), and is an error
 * otherwise — two keys never share a hash, nor two hashes an id.
 */
async function insertKeepingExisting<T extends Document>(
  coll: Collection<Document>,
  docs: T[],
  same: (existing: Document, doc: T) => boolean,
  what: string,
): Promise<void> {
  try {
    await coll.insertMany(docs, { ordered: false });
    return;
  } catch (err) {
    // FerretDB ends even an unordered insert at its first error: go one by one.
    if (!isDuplicate(err) && !(err as { writeErrors?: unknown }).writeErrors) throw err;
  }
  for (const doc of docs) {
    try {
      await coll.insertOne(doc);
    } catch (err) {
      if (!isDuplicate(err)) throw err;
      const existing = await coll.findOne({ _id: doc._id });
      if (!existing || !same(existing, doc)) {
        throw new Error(`migration: ${what} ${doc._id} is already taken by another key; nothing was overwritten`);
      }
    }
  }
}

/** Keeps the old `keys` collection as a fence against earlier versions (see FENCE_IDS). */
async function fence(legacy: Collection<Document>): Promise<void> {
  for (const [i, _id] of FENCE_IDS.entries()) {
    try {
      await legacy.insertOne({ _id, enabled: i === 0, note: "keys live in the bucketed layout (docs/storage-layout.md)" });
    } catch (err) {
      if (!isDuplicate(err)) throw err;
    }
  }
  await legacy.createIndex({ enabled: 1 }, { unique: true, name: FENCE_INDEX });
}

/** Root keys are found by a pointer `{_id: hash, rootKeyId}` (collection `root_key_hashes`); gives every root key one. */
async function pointRootKeys(db: Db): Promise<number> {
  const pointers = db.collection<{ _id: string; rootKeyId: string }>("root_key_hashes");
  const have = new Set((await pointers.find({}).toArray()).map((p) => `${p._id}|${p.rootKeyId}`));
  let added = 0;
  for await (const r of db.collection<{ _id: string; hash: string }>("root_keys").find({}, { projection: { _id: 1, hash: 1 } })) {
    if (have.has(`${r.hash}|${r._id}`)) continue;
    try {
      await pointers.insertOne({ _id: r.hash, rootKeyId: r._id });
      added++;
    } catch (err) {
      if (!isDuplicate(err)) throw err;
      // The pointer of a root key deleted half-way (its pointer outlived it): point it at this one.
      const p = await pointers.findOne({ _id: r.hash });
      if (p && p.rootKeyId !== r._id && !(await db.collection<Document>("root_keys").findOne({ _id: p.rootKeyId }, { projection: { _id: 1 } }))) {
        await pointers.updateOne({ _id: r.hash }, { $set: { rootKeyId: r._id } });
        added++;
      }
    }
  }
  return added;
}
