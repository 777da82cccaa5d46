import { randomBytes } from "node:crypto";
import { MongoClient, MongoServerError, type Collection, type Db } from "mongodb";
import { AlreadyExistsError, UnavailableError } from "../../domain/errors.js";
import type {
  Credits,
  CreditsOp,
  CreditsTarget,
  IdentityPatch,
  IdentityRecord,
  JsonObject,
  KeyPatch,
  KeyRecord,
  RootKeyRecord,
} from "../../domain/types.js";
import { InvalidArgumentError } from "../../domain/errors.js";
import { COUNTERS, type Counts, type UsageQuery, type UsageRow } from "../../usage/types.js";
import { applyCreditsOp, spendFromBalance } from "../credits-op.js";
import type { Change, KeyFilter, PageQuery, RefillDue, SpendResult, Store } from "../store.js";
import { createUsageSlots, type SlotDoc } from "./usage-slots.js";

/*
 * Documents mirror the domain records with `_id` for the id. `meta` is stored
 * as a JSON string: it is never queried, and a string cannot carry `$` or dotted
 * field names into the database. Every filter below is built from typed values
 * (strings checked against the input patterns, numbers), never from a caller's
 * object, so no request can inject a query operator.
 */
type IdentityDoc = Omit<IdentityRecord, "id" | "meta"> & { _id: string; meta: string };
type KeyDoc = Omit<KeyRecord, "id" | "meta"> & { _id: string; meta: string };
type RootKeyDoc = Omit<RootKeyRecord, "id"> & { _id: string };
type SettingDoc = { _id: string; value: string };
type CounterDoc = { _id: string; seq: number };
/** A usage row of one writer (one server process); `seq` is the last batch applied to it. */
type UsageDoc = { _id: string; g: string; b: number; k: string; i: string | null; tag: string; seq: number } & Counts;
type LockDoc = { _id: string; token: string; until: number };
type ActivityDoc = { _id: string; lastUsedAt: number };

/** How long a lock is held at most before another writer may take it over. */
const LOCK_LEASE_MS = 10_000;
/** How long a writer waits for a lock before answering UNAVAILABLE. */
const LOCK_WAIT_MS = 5_000;
type ChangeDoc = { _id: number; at: number; kind: "key" | "identity"; id: string; hash: string | null };

/** The stored form of an identity (exported for bulk seeding in the benchmark). */
export function toIdentityDoc(r: IdentityRecord): IdentityDoc {
  const { id, meta, ...rest } = r;
  return { _id: id, meta: JSON.stringify(meta), ...rest };
}
function fromIdentityDoc(d: IdentityDoc): IdentityRecord {
  const { _id, meta, ...rest } = d;
  return { id: _id, meta: JSON.parse(meta) as JsonObject, ...rest };
}
/** The stored form of a key (exported for bulk seeding in the benchmark). */
export function toKeyDoc(r: KeyRecord): KeyDoc {
  const { id, meta, ...rest } = r;
  return { _id: id, meta: JSON.stringify(meta), ...rest };
}
function fromKeyDoc(d: KeyDoc): KeyRecord {
  const { _id, meta, ...rest } = d;
  return { id: _id, meta: JSON.parse(meta) as JsonObject, ...rest };
}
function fromRootKeyDoc(d: RootKeyDoc): RootKeyRecord {
  const { _id, ...rest } = d;
  return { id: _id, ...rest };
}

/** `$set` for a patch: meta as a JSON string, other fields as they are. */
function setOf(patch: IdentityPatch | KeyPatch, now: number): Record<string, unknown> {
  const set: Record<string, unknown> = { updatedAt: now };
  for (const [k, v] of Object.entries(patch)) {
    if (v === undefined) continue;
    set[k] = k === "meta" ? JSON.stringify(v) : v;
  }
  return set;
}

const UNAVAILABLE = new Set([
  "MongoNetworkError",
  "MongoNetworkTimeoutError",
  "MongoServerSelectionError",
  "MongoNotConnectedError",
  "MongoTopologyClosedError",
  "MongoPoolClearedError",
]);

/**
 * A unique index refused the write. FerretDB (SQLite backend) reports a
 * violation by an update as code 1 with SQLite's message instead of 11000.
 */
function isDuplicateKey(err: unknown): err is MongoServerError {
  return err instanceof MongoServerError && isDuplicateCode(err.code, err.message);
}

function isDuplicateCode(code: unknown, message: string | undefined): boolean {
  return code === 11000 || (code === 1 && /UNIQUE constraint failed/.test(message ?? ""));
}

function escapeRegex(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\\-]/g, "\\$&");
}

export interface MongoStoreOptions {
  uri: string;
  database: string;
  serverSelectionTimeoutMs?: number;
  /** Lease of a usage writer slot (usage-slots.ts); default 60 s. */
  usageLeaseMs?: number;
}

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
export class MongoStore implements Store {
  readonly kind = "mongodb" as const;
  /** Shared with the MongoDB rate-limit counter, so one deployment holds one connection pool. */
  readonly client: MongoClient;
  private db!: Db;
  private identities!: Collection<IdentityDoc>;
  private keys!: Collection<KeyDoc>;
  private rootKeys!: Collection<RootKeyDoc>;
  private settings!: Collection<SettingDoc>;
  private counters!: Collection<CounterDoc>;
  private changes!: Collection<ChangeDoc>;
  private usage!: Collection<UsageDoc>;
  private locks!: Collection<LockDoc>;
  private activity!: Collection<ActivityDoc>;
  private usageWriters!: Collection<SlotDoc>;
  /** Usage rows are written under a leased writer slot, so restarts do not multiply them (usage-slots.ts). */
  private readonly usageSlots: ReturnType<typeof createUsageSlots>;
  /** In-process queue per lock name, so this process never races itself for a lock. */
  private readonly localLocks = new Map<string, Promise<void>>();
  /** "ferretdb" when the server is FerretDB (see `init`). */
  flavor: "mongodb" | "ferretdb" = "mongodb";

  constructor(private readonly opts: MongoStoreOptions) {
    this.usageSlots = createUsageSlots(() => this.usageWriters, { leaseMs: opts.usageLeaseMs });
    this.client = new MongoClient(opts.uri, {
      serverSelectionTimeoutMS: opts.serverSelectionTimeoutMs ?? 5000,
      // No answer within 30 s fails the operation (UNAVAILABLE) instead of
      // waiting forever on a server that stopped answering; the URI may set its own.
      ...(/[?&]socketTimeoutMS=/i.test(opts.uri) ? {} : { socketTimeoutMS: 30_000 }),
      appName: "latchkey",
    });
  }

  /** Runs a driver call, turning driver errors into domain errors. */
  private async run<T>(fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      if (isDuplicateKey(err)) {
        const msg = String(err.message);
        throw new AlreadyExistsError(/externalId|external_id/.test(msg) ? "an identity with this external_id already exists" : "already exists");
      }
      if (err instanceof Error && UNAVAILABLE.has(err.name)) throw new UnavailableError(`mongodb: ${err.name}`);
      throw err;
    }
  }

  async init(): Promise<void> {
    await this.run(async () => {
      await this.client.connect();
      this.db = this.client.db(this.opts.database);
      this.identities = this.db.collection<IdentityDoc>("identities");
      this.keys = this.db.collection<KeyDoc>("keys");
      this.rootKeys = this.db.collection<RootKeyDoc>("root_keys");
      this.settings = this.db.collection<SettingDoc>("settings");
      this.counters = this.db.collection<CounterDoc>("counters");
      this.changes = this.db.collection<ChangeDoc>("changes");
      await this.changes.createIndex({ at: 1 }, { name: "at" });
      this.locks = this.db.collection<LockDoc>("locks");
      this.activity = this.db.collection<ActivityDoc>("key_activity");
      const info = await this.db.admin().command({ buildInfo: 1 }).catch(() => ({}) as Record<string, unknown>);
      this.flavor = "ferretdbVersion" in info ? "ferretdb" : "mongodb";
      this.usage = this.db.collection<UsageDoc>("usage");
      this.usageWriters = this.db.collection<SlotDoc>("usage_writers");
      await this.usage.createIndex({ i: 1, g: 1, b: 1 }, { name: "identity_bucket" });
      await this.usage.createIndex({ k: 1, g: 1, b: 1 }, { name: "key_bucket" });
      await this.identities.createIndex({ externalId: 1 }, { unique: true, name: "external_id_unique" });
      await this.keys.createIndex({ hash: 1 }, { unique: true, name: "hash_unique" });
      await this.keys.createIndex({ apiId: 1, _id: 1 }, { name: "api_id" });
      await this.keys.createIndex({ identityId: 1, _id: 1 }, { name: "identity_id" });
      await this.rootKeys.createIndex({ hash: 1 }, { unique: true, name: "hash_unique" });
    });
  }

  async ping(): Promise<void> {
    await this.run(() => this.db.command({ ping: 1 }));
  }

  async close(): Promise<void> {
    await this.usageSlots.release();
    await this.client.close();
  }

  /**
   * Runs `fn` holding the lock `name`: first in this process (a promise queue),
   * then across processes (a lock document taken by a unique insert, with a
   * lease after which a crashed holder's lock is taken over).
   */
  private async locked<T>(name: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.localLocks.get(name) ?? Promise.resolve();
    let release!: () => void;
    const mine = new Promise<void>((r) => (release = r));
    const tail = prev.then(() => mine);
    this.localLocks.set(name, tail);
    await prev;
    try {
      const token = randomBytes(8).toString("hex");
      const deadline = Date.now() + LOCK_WAIT_MS;
      for (let attempt = 0; ; attempt++) {
        const now = Date.now();
        try {
          await this.locks.insertOne({ _id: name, token, until: now + LOCK_LEASE_MS });
          break;
        } catch (err) {
          if (!isDuplicateKey(err)) throw err;
          const holder = await this.locks.findOne({ _id: name });
          if (holder && holder.until < now) await this.locks.deleteOne({ _id: name, token: holder.token });
          if (now > deadline) throw new UnavailableError(`busy: ${name} stayed locked`);
          await new Promise((r) => setTimeout(r, Math.min(25, 1 + attempt * 2) * Math.random()));
        }
      }
      try {
        return await fn();
      } finally {
        await this.locks.deleteOne({ _id: name, token }).catch(() => undefined);
      }
    } finally {
      release();
      if (this.localLocks.get(name) === tail) this.localLocks.delete(name);
    }
  }

  /**
   * Appends to the change feed after the write it describes. The seq comes from
   * one atomic counter, so it increases across instances; a reader tolerates the
   * short gaps that concurrent writers leave (src/cache/invalidation.ts).
   */
  private async recordChange(kind: "key" | "identity", id: string, hash: string | null): Promise<void> {
    // A duplicate seq (racing first upserts; servers such as FerretDB that do not
    // apply $inc atomically, where lost increments leave the counter behind the
    // feed) takes another one instead of failing the write, after moving the
    // counter up to the newest change so the next try does not collide again.
    for (let attempt = 0; ; attempt++) {
      try {
        const c = await this.counters.findOneAndUpdate({ _id: "changes" }, { $inc: { seq: 1 } }, { upsert: true, returnDocument: "after" });
        await this.changes.insertOne({ _id: c!.seq, at: Date.now(), kind, id, hash });
        return;
      } catch (err) {
        if (!isDuplicateKey(err) || attempt >= 1000) throw err;
        const newest = await this.changes.find({}, { projection: { _id: 1 } }).sort({ _id: -1 }).limit(1).next();
        if (newest) await this.counters.updateOne({ _id: "changes" }, { $max: { seq: newest._id } });
      }
    }
  }

  async createIdentity(rec: IdentityRecord): Promise<void> {
    await this.run(() => this.identities.insertOne(toIdentityDoc(rec)));
  }

  async ensureIdentity(rec: IdentityRecord): Promise<{ identity: IdentityRecord; created: boolean }> {
    for (let attempt = 0; attempt < 3; attempt++) {
      const existing = await this.getIdentityByExternalId(rec.externalId);
      if (existing) return { identity: existing, created: false };
      try {
        await this.createIdentity(rec);
        return { identity: rec, created: true };
      } catch (err) {
        // Lost a race with a concurrent create: read the winner.
        if (!(err instanceof AlreadyExistsError)) throw err;
      }
    }
    throw new UnavailableError("could not create or read the identity; retry");
  }

  async getIdentity(id: string): Promise<IdentityRecord | null> {
    const d = await this.run(() => this.identities.findOne({ _id: id }));
    return d ? fromIdentityDoc(d) : null;
  }

  async getIdentityByExternalId(externalId: string): Promise<IdentityRecord | null> {
    const d = await this.run(() => this.identities.findOne({ externalId }));
    return d ? fromIdentityDoc(d) : null;
  }

  async getIdentities(ids: string[]): Promise<IdentityRecord[]> {
    if (ids.length === 0) return [];
    const docs = await this.run(() => this.identities.find({ _id: { $in: ids } }).toArray());
    return docs.map(fromIdentityDoc);
  }

  async listIdentities(page: PageQuery, search: string | null): Promise<IdentityRecord[]> {
    const filter: Record<string, unknown> = { _id: { $gt: page.afterId ?? "" } };
    if (search !== null) filter.externalId = { $regex: escapeRegex(search), $options: "i" };
    const docs = await this.run(() => this.identities.find(filter).sort({ _id: 1 }).limit(page.limit).toArray());
    return docs.map(fromIdentityDoc);
  }

  async updateIdentity(id: string, patch: IdentityPatch, now: number): Promise<IdentityRecord | null> {
    const d = await this.run(() =>
      this.locked(`identity:${id}`, () => this.identities.findOneAndUpdate({ _id: id }, { $set: setOf(patch, now) }, { returnDocument: "after" })),
    );
    if (!d) return null;
    await this.run(() => this.recordChange("identity", id, null));
    return fromIdentityDoc(d);
  }

  async deleteIdentity(id: string, deleteKeys: boolean): Promise<{ deletedKeys: number; unlinkedKeys: number } | null> {
    return this.run(async () => {
      if (!(await this.identities.findOne({ _id: id }, { projection: { _id: 1 } }))) return null;
      // Keys first: a failure half-way leaves an identity with fewer keys, never keys
      // pointing at a deleted identity.
      let deletedKeys = 0;
      let unlinkedKeys = 0;
      const affected = await this.keys.find({ identityId: id }, { projection: { _id: 1, hash: 1 } }).toArray();
      if (deleteKeys) {
        deletedKeys = (await this.keys.deleteMany({ identityId: id })).deletedCount;
      } else {
        for (const k of affected) {
          const res = await this.locked(`key:${k._id}`, () =>
            this.keys.updateOne({ _id: k._id, identityId: id }, { $set: { identityId: null, updatedAt: Date.now() } }),
          );
          unlinkedKeys += res.modifiedCount;
        }
      }
      const res = await this.identities.deleteOne({ _id: id });
      for (const k of affected) await this.recordChange("key", k._id, k.hash);
      await this.recordChange("identity", id, null);
      return res.deletedCount === 1 ? { deletedKeys, unlinkedKeys } : null;
    });
  }

  async createKey(rec: KeyRecord): Promise<void> {
    await this.run(() => this.keys.insertOne(toKeyDoc(rec)));
    // Clears negative cache entries for this hash on every instance.
    await this.run(() => this.recordChange("key", rec.id, rec.hash));
  }

  async getKey(id: string): Promise<KeyRecord | null> {
    const d = await this.run(() => this.keys.findOne({ _id: id }));
    return d ? (await this.withLastUsed([fromKeyDoc(d)]))[0] : null;
  }

  /** Adds last-used times, kept apart from key documents (see the class comment). */
  private async withLastUsed(keys: KeyRecord[]): Promise<KeyRecord[]> {
    if (keys.length === 0) return keys;
    const docs = await this.run(() => this.activity.find({ _id: { $in: keys.map((k) => k.id) } }).toArray());
    const at = new Map(docs.map((d) => [d._id, d.lastUsedAt]));
    return keys.map((k) => ({ ...k, lastUsedAt: at.get(k.id) ?? k.lastUsedAt }));
  }

  async getKeyByHash(hash: string): Promise<KeyRecord | null> {
    const d = await this.run(() => this.keys.findOne({ hash }));
    return d ? fromKeyDoc(d) : null;
  }

  async listKeys(filter: KeyFilter, page: PageQuery): Promise<KeyRecord[]> {
    const q: Record<string, unknown> = { _id: { $gt: page.afterId ?? "" } };
    if (filter.apiId !== undefined) q.apiId = filter.apiId;
    if (filter.identityId !== undefined) q.identityId = filter.identityId;
    const docs = await this.run(() => this.keys.find(q).sort({ _id: 1 }).limit(page.limit).toArray());
    return this.withLastUsed(docs.map(fromKeyDoc));
  }

  async updateKey(id: string, patch: KeyPatch, now: number): Promise<KeyRecord | null> {
    const d = await this.run(() =>
      this.locked(`key:${id}`, () => this.keys.findOneAndUpdate({ _id: id }, { $set: setOf(patch, now) }, { returnDocument: "after" })),
    );
    if (!d) return null;
    await this.run(() => this.recordChange("key", id, d.hash));
    return (await this.withLastUsed([fromKeyDoc(d)]))[0];
  }

  async deleteKey(id: string): Promise<boolean> {
    const d = await this.run(() => this.keys.findOneAndDelete({ _id: id }));
    if (!d) return false;
    await this.run(() => this.recordChange("key", id, d.hash));
    await this.run(() => this.activity.deleteOne({ _id: id }));
    return true;
  }

  async rerollKey(oldId: string, next: KeyRecord, oldExpiresAt: number, now: number): Promise<boolean> {
    if (!(await this.getKey(oldId))) return false;
    await this.createKey(next);
    try {
      const res = await this.run(() =>
        this.locked(`key:${oldId}`, () => this.keys.findOneAndUpdate({ _id: oldId }, { $set: { expiresAt: oldExpiresAt, updatedAt: now } })),
      );
      if (res) {
        await this.run(() => this.recordChange("key", oldId, res.hash));
        return true;
      }
      await this.deleteKey(next.id); // the old key vanished meanwhile
      return false;
    } catch (err) {
      await this.keys.deleteOne({ _id: next.id }).catch(() => undefined);
      throw err;
    }
  }

  private creditsColl(target: CreditsTarget) {
    return {
      coll: ("keyId" in target ? this.keys : this.identities) as unknown as Collection<{ _id: string; credits: Credits | null; hash?: string }>,
      id: "keyId" in target ? target.keyId : target.identityId,
      lock: "keyId" in target ? `key:${target.keyId}` : `identity:${target.identityId}`,
    };
  }

  async updateCredits(target: CreditsTarget, op: CreditsOp, now: number): Promise<Credits | null | undefined> {
    const { coll, id, lock } = this.creditsColl(target);
    return this.run(async () => {
      const res = await this.locked(lock, async () => {
        const cur = await coll.findOne({ _id: id });
        if (!cur) return undefined;
        const credits = applyCreditsOp(cur.credits, op);
        await coll.updateOne({ _id: id }, { $set: { credits, updatedAt: now } });
        return { credits, hash: cur.hash ?? null };
      });
      if (!res) return undefined;
      await this.recordChange("keyId" in target ? "key" : "identity", id, res.hash);
      return res.credits;
    });
  }

  async spendCredits(target: CreditsTarget, cost: number, refill: RefillDue | null): Promise<SpendResult> {
    const { coll, id, lock } = this.creditsColl(target);
    return this.run(() =>
      this.locked(lock, async (): Promise<SpendResult> => {
        const cur = await coll.findOne({ _id: id });
        if (!cur?.credits) return { ok: true, remaining: null };
        // Under the lock, the refill time is a plain check: each period refills once.
        const { ok, credits, changed } = spendFromBalance(cur.credits, cost, refill);
        if (changed) await coll.updateOne({ _id: id }, { $set: { credits } });
        return { ok, remaining: credits.remaining };
      }),
    );
  }

  async changesSince(afterSeq: number, limit: number): Promise<Change[]> {
    const docs = await this.run(() => this.changes.find({ _id: { $gt: afterSeq } }).sort({ _id: 1 }).limit(limit).toArray());
    return docs.map((d) => (d.kind === "key" ? { seq: d._id, kind: "key", id: d.id, hash: d.hash! } : { seq: d._id, kind: "identity", id: d.id }));
  }

  async lastChangeSeq(): Promise<number> {
    const c = await this.run(() => this.counters.findOne({ _id: "changes" }));
    return c?.seq ?? 0;
  }

  async pruneChanges(olderThanMs: number): Promise<void> {
    await this.run(() => this.changes.deleteMany({ at: { $lt: olderThanMs } }));
  }

  async writeUsage(rows: UsageRow[], batch: { writer: string; seq: number }): Promise<void> {
    if (rows.length === 0) return;
    // Rows are per writer slot (leased by one server process at a time, which
    // writes one batch at a time), so no two writers ever update one document. A
    // row already carrying this batch's seq does not match the filter; its upsert
    // then hits the unique _id and is skipped: a retried batch is applied once.
    const slot = await this.run(() => this.usageSlots.slotFor(batch.writer));
    const seq = slot.rowSeq(batch.seq);
    const ops = rows.map((r) => {
      const inc: Record<string, number> = {};
      for (const c of COUNTERS) if (r.counts[c] !== 0) inc[c] = r.counts[c];
      const _id = `${slot.id}|${r.granularity}|${r.bucket}|${r.keyId}|${r.identityId ?? ""}|${r.tag}`;
      return {
        updateOne: {
          filter: { _id, $or: [{ seq: { $exists: false } }, { seq: { $lt: seq } }] },
          update: { $inc: inc, $set: { seq }, $setOnInsert: { g: r.granularity, b: r.bucket, k: r.keyId, i: r.identityId, tag: r.tag } },
          upsert: true,
        },
      };
    });
    await this.run(async () => {
      for (let i = 0; i < ops.length; i += 500) {
        const chunk = ops.slice(i, i + 500);
        try {
          await this.usage.bulkWrite(chunk as never, { ordered: false });
        } catch (err) {
          const writeErrors = (err as { writeErrors?: unknown }).writeErrors;
          const list = (Array.isArray(writeErrors) ? writeErrors : writeErrors ? [writeErrors] : null) as
            | { code?: number; errmsg?: string }[]
            | null;
          if (!list || list.some((e) => !isDuplicateCode(e.code, e.errmsg))) throw err;
          // FerretDB ends even an unordered batch at its first error, without
          // applying or reporting the rest: apply the chunk again row by row
          // (each op is idempotent: a row already at this seq is skipped).
          for (const op of chunk) {
            try {
              await this.usage.updateOne(op.updateOne.filter, op.updateOne.update, { upsert: true });
            } catch (e) {
              if (!isDuplicateKey(e)) throw e;
            }
          }
        }
      }
    });
    // Before the next batch: a new owner of the slot starts past this seq.
    await this.run(() => this.usageSlots.applied(slot, seq));
  }

  async queryUsage(q: UsageQuery): Promise<UsageRow[]> {
    const filter: Record<string, unknown> = {
      ...("identityId" in q.by ? { i: q.by.identityId } : { k: q.by.keyId }),
      g: q.granularity,
      b: { $gte: q.start, $lt: q.end },
      tag: q.tagged ? { $ne: "" } : "",
    };
    const docs = await this.run(() => this.usage.find(filter).limit(q.maxRows + 1).toArray());
    if (docs.length > q.maxRows) throw new InvalidArgumentError("start_time", "the range holds too many rows for this breakdown; narrow it or use a coarser granularity");
    return docs.map((d) => {
      const counts = {} as Counts;
      for (const c of COUNTERS) counts[c] = d[c] ?? 0;
      // `i ?? null`: FerretDB leaves a null out of $setOnInsert.
      return { granularity: d.g as UsageRow["granularity"], bucket: d.b, keyId: d.k, identityId: d.i ?? null, tag: d.tag, counts };
    });
  }

  async touchLastUsed(times: Map<string, number>): Promise<void> {
    if (times.size === 0) return;
    // Its own collection: a write here can never clobber a concurrent key update.
    await this.run(() =>
      this.activity.bulkWrite(
        [...times].map(([id, t]) => ({ updateOne: { filter: { _id: id }, update: { $max: { lastUsedAt: t } }, upsert: true } })),
        { ordered: false },
      ),
    );
  }

  async pruneUsage(granularity: "minute" | "hour" | "day", before: number): Promise<void> {
    await this.run(() => this.usage.deleteMany({ g: granularity, b: { $lt: before } }));
  }

  async createRootKey(rec: RootKeyRecord): Promise<void> {
    const { id, ...rest } = rec;
    await this.run(() => this.rootKeys.insertOne({ _id: id, ...rest }));
  }

  async getRootKeyByHash(hash: string): Promise<RootKeyRecord | null> {
    const d = await this.run(() => this.rootKeys.findOne({ hash }));
    return d ? fromRootKeyDoc(d) : null;
  }

  async listRootKeys(): Promise<RootKeyRecord[]> {
    const docs = await this.run(() => this.rootKeys.find({}).sort({ _id: 1 }).toArray());
    return docs.map(fromRootKeyDoc);
  }

  async deleteRootKey(id: string): Promise<boolean> {
    const res = await this.run(() => this.rootKeys.deleteOne({ _id: id }));
    return res.deletedCount === 1;
  }

  async createFirstRootKey(rec: RootKeyRecord): Promise<boolean> {
    try {
      await this.run(() => this.settings.insertOne({ _id: "bootstrapped", value: String(rec.createdAt) }));
    } catch (err) {
      if (err instanceof AlreadyExistsError) return false;
      throw err;
    }
    try {
      await this.createRootKey(rec);
      return true;
    } catch (err) {
      await this.settings.deleteOne({ _id: "bootstrapped" }).catch(() => undefined);
      throw err;
    }
  }
}
