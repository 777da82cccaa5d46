import { performance } from "node:perf_hooks";
import { MongoClient, MongoServerError, type Collection, type Db } from "mongodb";
import { UnavailableError } from "../../domain/errors.js";
import type { ChangeTargets } from "../store.js";
import { createLockManager, type LockDoc, type LockManager } from "./lease-lock.js";
import { createUsageSlots, type SlotDoc } from "./usage-slots.js";
import {
  createKeyBuckets,
  defaultCreditWrites,
  defaultKeyLayout,
  FEED_PREFIX,
  feedBucketSize,
  feedCollection,
  serverFlavor,
  type KeyBuckets,
  type KeyLayout,
} from "./ferretdb.js";
import { readLayout, recordLayout, settleBucketedLayout, type MigrationReport } from "./layout-migration.js";
import {
  seqId,
  toFeedDoc,
  type ActivityDoc,
  type FeedDoc,
  type FeedEntry,
  type IdentityDoc,
  type KeyDoc,
  type LastUsedDoc,
  type RootKeyDoc,
  type RootKeyHashDoc,
  type SettingDoc,
  type UsageDoc,
  type UsageLogDoc,
  type UsagePackDoc,
} from "./documents.js";
import { isDuplicateKey, runMapped } from "./errors.js";

/**
 * A write announced by an intent lands within this long of the intent becoming
 * visible, or never: readers pin its entries this long at most.
 */
const WRITE_BOUND_MS = 10_000;
/** Server time allowed to the data write itself (maxTimeMS); it must be sent by WRITE_BOUND_MS - this after the intent. */
const WRITE_MAX_MS = 2000;
/**
 * How long a seq known to have been the newest may number the next change:
 * half the readers' pruning retention (5 s, src/cache/invalidation.ts), so the
 * entries above it cannot have been pruned meanwhile.
 */
const HEAD_HINT_MS = 2500;

export interface MongoStoreOptions {
  uri: string;
  database: string;
  serverSelectionTimeoutMs?: number;
  /** Lease of a usage writer slot (usage-slots.ts); default 60 s. */
  usageLeaseMs?: number;
  /** How often the usage log is applied to the usage rows (usage.ts); default 30 s, 0: only at close and on `rollUpUsage`. */
  usageRollupMs?: number;
  /** Tests: called after each chunk of rows a usage roll-up applied; throwing stops it there, as a crash would. */
  usageRollupAfterChunk?: (applied: number) => void | Promise<void>;
  /** Tests: rows a usage roll-up applies per write (default 500). */
  usageRollupChunk?: number;
  /** How long the timer's usage roll-ups leave the older versions' packs before deleting them together (usage.ts, rollUp); default 10 min. */
  usageSupersededDeleteMs?: number;
  /**
   * How credits are written. "conditional": one conditional update per spend
   * (`remaining ≥ cost` in the filter, `$inc` in the update) and compare-and-set
   * on the document's write counter for other credit writes, no lock — relies on
   * MongoDB applying a single-document update with its filter atomically.
   * "locked": read and fenced write under the lease lock — for FerretDB, whose
   * updates are a read and a write. Default: by server ("locked" on FerretDB).
   * Tests force "conditional" on FerretDB with one writer.
   */
  creditWrites?: "conditional" | "locked";
  /** Lock tuning (tests): see lease-lock.ts. */
  lock?: { leaseMs?: number; waitMs?: number; queueMax?: number };
  /**
   * Where keys live (ferretdb.ts), for a database that has not recorded one
   * yet. Default: by server ("bucketed" on FerretDB). A database keeps the
   * layout it recorded. Tests force "indexed" on FerretDB to run MongoDB's path.
   */
  layout?: KeyLayout;
  /** Tests: called after each batch of keys the start-up migration copied; throwing stops it there, as a crash would. */
  migrationAfterBatch?: (copied: number) => void | Promise<void>;
  /** Tests: keys copied per batch by the start-up migration (default 500). */
  migrationBatch?: number;
  /** Tests: emit the driver's command events on `client` (counting what a lookup reads). */
  monitorCommands?: boolean;
}

/**
 * What the parts of the MongoDB store share (identities.ts, keys.ts,
 * credits.ts, change-feed.ts, usage.ts, root-keys.ts each take one): the
 * client, database and collections, the options and what `init` learnt of the
 * server, the driver-error mapping (`run`), the lease locks (`locked`) and the
 * change feed's appender with the intent/done bracket of every key and
 * identity write (`changing`). MongoStore is one (it extends this class); this
 * module imports none of the parts.
 */
export class MongoContext {
  /** Shared with the MongoDB rate-limit counter, so one deployment holds one connection pool. */
  readonly client: MongoClient;
  db!: Db;
  identities!: Collection<IdentityDoc>;
  keys!: Collection<KeyDoc>;
  rootKeys!: Collection<RootKeyDoc>;
  rootKeyHashes!: Collection<RootKeyHashDoc>;
  /** Bucketed layout: the collections of key documents by hash and of key ids, in companion databases (ferretdb.ts). */
  buckets!: KeyBuckets;
  settings!: Collection<SettingDoc>;
  /** One document holding (about) the newest seq, see newestSeq. */
  feedHeadDoc!: Collection<{ _id: string; seq: number }>;
  /** Usage rows as roll-ups wrote them: packs of rows (usage.ts), and single-row documents from before packs. */
  usage!: Collection<UsageDoc | UsagePackDoc>;
  /** Usage batches as flushed, until a roll-up applies them to `usage` (usage.ts). */
  usageLog!: Collection<UsageLogDoc>;
  locks!: Collection<LockDoc>;
  lockManager!: LockManager;
  activity!: Collection<ActivityDoc>;
  /** Bucketed layout: last-used times, one document per key-id bucket (keys.ts). */
  lastUsed!: Collection<LastUsedDoc>;
  usageWriters!: Collection<SlotDoc>;
  /** Usage rows are written under a leased writer slot, so restarts do not multiply them (usage-slots.ts). */
  readonly usageSlots: ReturnType<typeof createUsageSlots>;
  /** A seq that was the newest in the change feed at `at` (performance.now()): where the next change is numbered from. */
  feedHead: { seq: number; at: number } | null = null;
  appendTail: Promise<unknown> = Promise.resolve();
  /** Seqs per change feed collection (set by `init` for the server, see FeedDoc). */
  feedBucket = 100_000;
  /** "ferretdb" when the server is FerretDB (see `init`). */
  flavor: "mongodb" | "ferretdb" = "mongodb";
  /** How credits are written (see MongoStoreOptions.creditWrites); set by `init`. */
  creditWrites: "conditional" | "locked" = "locked";
  /** Where keys live (ferretdb.ts); set by `init`. */
  layout: KeyLayout = "indexed";
  /** What the start-up migration moved to the bucketed layout (null: none ran). */
  migrated: MigrationReport | null = null;

  /** The database this store uses. */
  get database(): string {
    return this.opts.database;
  }

  constructor(readonly opts: MongoStoreOptions) {
    this.usageSlots = createUsageSlots(() => this.usageWriters, { leaseMs: opts.usageLeaseMs });
    this.client = new MongoClient(opts.uri, {
      serverSelectionTimeoutMS: opts.serverSelectionTimeoutMs ?? 5000,
      // No answer within 30 s fails the operation (UNAVAILABLE) instead of
      // waiting forever on a server that stopped answering; the URI may set its own.
      ...(/[?&]socketTimeoutMS=/i.test(opts.uri) ? {} : { socketTimeoutMS: 30_000 }),
      appName: "latchkey",
      ...(opts.monitorCommands ? { monitorCommands: true } : {}),
    });
  }

  /** Runs a driver call, turning driver errors into domain errors. */
  async run<T>(fn: () => Promise<T>): Promise<T> {
    return runMapped(fn);
  }

  async init(): Promise<void> {
    await this.run(async () => {
      await this.client.connect();
      this.db = this.client.db(this.opts.database);
      this.identities = this.db.collection<IdentityDoc>("identities");
      this.keys = this.db.collection<KeyDoc>("keys");
      this.rootKeys = this.db.collection<RootKeyDoc>("root_keys");
      this.settings = this.db.collection<SettingDoc>("settings");
      // "change_feed_<n>", not the "changes" of earlier versions (numeric ids, written after the data).
      this.feedHeadDoc = this.db.collection("change_feed_head");
      this.locks = this.db.collection<LockDoc>("locks");
      this.lockManager = createLockManager(this.locks, this.opts.lock);
      this.activity = this.db.collection<ActivityDoc>("key_activity");
      this.lastUsed = this.db.collection<LastUsedDoc>("key_last_used");
      const info = await this.db.admin().command({ buildInfo: 1 }).catch(() => ({}) as Record<string, unknown>);
      this.flavor = serverFlavor(info);
      this.creditWrites = this.opts.creditWrites ?? defaultCreditWrites(this.flavor);
      this.feedBucket = feedBucketSize(this.flavor);
      this.usage = this.db.collection<UsageDoc | UsagePackDoc>("usage");
      this.usageWriters = this.db.collection<SlotDoc>("usage_writers");
      this.usageLog = this.db.collection<UsageLogDoc>("usage_log");
      await this.usageLog.createIndex({ slot: 1, seq: 1 }, { name: "slot_seq" });
      if (this.flavor === "mongodb") {
        // Reads by identity or key (usage.ts). Not on FerretDB: it indexes an array as one value, the whole list, and uses no such index.
        await this.usageLog.createIndex({ i: 1 }, { name: "log_identity" });
        await this.usageLog.createIndex({ k: 1 }, { name: "log_key" });
      }
      // Single-row versions and packs (usage.ts, whose `i` / `k` are lists: multikey) alike.
      await this.usage.createIndex({ i: 1, g: 1, b: 1 }, { name: "identity_bucket" });
      await this.usage.createIndex({ k: 1, g: 1, b: 1 }, { name: "key_bucket" });
      await this.usage.createIndex({ s: 1, g: 1, b: 1 }, { name: "slot_bucket" });
      await this.identities.createIndex({ externalId: 1 }, { unique: true, name: "external_id_unique" });
      await this.rootKeys.createIndex({ hash: 1 }, { unique: true, name: "hash_unique" });
      this.rootKeyHashes = this.db.collection<RootKeyHashDoc>("root_key_hashes");
      this.buckets = createKeyBuckets(this.client, this.opts.database);
      // The layout this database recorded wins; a database without one is new, or was written by an earlier version (indexed).
      const recorded = await readLayout(this.settings);
      const layout = recorded ?? this.opts.layout ?? defaultKeyLayout(this.flavor);
      if (layout === "bucketed") {
        this.migrated = await settleBucketedLayout({
          db: this.db,
          buckets: this.buckets,
          locked: (name, fn) => this.locked(name, fn),
          afterBatch: this.opts.migrationAfterBatch,
          batch: this.opts.migrationBatch,
        });
      } else {
        await this.keys.createIndex({ hash: 1 }, { unique: true, name: "hash_unique" });
        await this.keys.createIndex({ apiId: 1, _id: 1 }, { name: "api_id" });
        await this.keys.createIndex({ identityId: 1, _id: 1 }, { name: "identity_id" });
      }
      this.layout = recorded ?? (await recordLayout(this.settings, layout));
      if (this.layout !== layout) throw new Error(`another instance recorded the ${this.layout} key layout while this one set up the ${layout} one; restart`);
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
   * Runs `fn` holding the lock `name` (lease-lock.ts): in this process, then
   * across processes. Writes `fn` makes to a locked document must be fenced.
   */
  locked<T>(name: string, fn: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    return this.lockManager.locked(name, fn, signal);
  }

  /** The name of the change feed collection holding `seq` (public for writing history in bulk in the benchmark). */
  feedCollectionName(seq: number): string {
    return feedCollection(seq, this.feedBucket);
  }

  /** The change feed collection holding `seq`. */
  feedOf(seq: number): Collection<FeedDoc> {
    return this.db.collection<FeedDoc>(this.feedCollectionName(seq));
  }

  /** The buckets of the change feed that exist, ascending. */
  async feedBuckets(): Promise<number[]> {
    const names = await this.db.listCollections({}, { nameOnly: true }).toArray();
    return names
      .map((c) => c.name)
      .filter((n) => n.startsWith(FEED_PREFIX) && /^\d+$/.test(n.slice(FEED_PREFIX.length)))
      .map((n) => Number(n.slice(FEED_PREFIX.length)))
      .sort((a, b) => a - b);
  }

  async feedHas(seq: number): Promise<boolean> {
    return (await this.feedOf(seq).findOne({ _id: seqId(seq) }, { projection: { _id: 1 } })) !== null;
  }

  /** The newest or oldest entry of one bucket (FerretDB sorts in Go, over one bucket at most). */
  async feedEnd(bucket: number, end: 1 | -1): Promise<number | null> {
    const d = await this.feedOf(bucket * this.feedBucket).find({}, { projection: { seq: 1 } }).sort({ _id: end }).limit(1).next();
    return d?.seq ?? null;
  }

  /**
   * The newest seq in the change feed (0 when empty). A head document, raised
   * after each append, is a hint (FerretDB may lose a concurrent raise): if seq
   * H exists and H+1 does not, H is the newest (entries are written without
   * gaps, and pruned from the oldest up). Otherwise the newest bucket answers.
   */
  async newestSeq(): Promise<number> {
    let h = (await this.feedHeadDoc.findOne({ _id: "head" }))?.seq ?? 0;
    if (h > 0 && (await this.feedHas(h))) {
      for (let steps = 0; steps < 64; steps++, h++) if (!(await this.feedHas(h + 1))) return h;
    }
    const buckets = await this.feedBuckets();
    for (let i = buckets.length - 1; i >= 0; i--) {
      const newest = await this.feedEnd(buckets[i], -1);
      if (newest !== null) return newest;
    }
    return 0;
  }

  /**
   * Appends one entry to the change feed and returns its seq. The seq is taken
   * by inserting `_id` = newest + 1, the one atomic primitive this store relies
   * on (a unique `_id` insert); a duplicate means another writer took it, so the
   * next one is tried. Seq N is thus only ever written once N-1 exists: the
   * feed has no gaps. "Newest" must be fresh: readers prune what they saw 10 s
   * ago, and a stale guess below the pruned range would insert a seq that
   * readers have passed (docs/revocation.md). Appends of this process go one
   * at a time, so its writers do not race each other for the same seq.
   * Returns the seq and when its insert was sent.
   */
  appendChange(entry: FeedEntry): Promise<{ seq: number; sentAt: number }> {
    const run = this.appendTail.then(() => this.appendNow(entry));
    this.appendTail = run.catch(() => undefined);
    return run;
  }

  async appendNow(entry: FeedEntry): Promise<{ seq: number; sentAt: number }> {
    let base = this.feedHead;
    let seq = base?.seq ?? 0;
    for (;;) {
      if (!base || performance.now() - base.at >= HEAD_HINT_MS) {
        const at = performance.now();
        base = { seq: await this.newestSeq(), at };
        seq = base.seq;
      }
      const sentAt = performance.now();
      try {
        await this.feedOf(seq + 1).insertOne(toFeedDoc(seq + 1, entry));
        if (!this.feedHead || this.feedHead.seq <= seq + 1) this.feedHead = { seq: seq + 1, at: sentAt };
        // A hint for newestSeq: not waited for, and a lost raise is harmless.
        void this.feedHeadDoc.updateOne({ _id: "head" }, { $max: { seq: seq + 1 } }, { upsert: true }).catch(() => undefined);
        return { seq: seq + 1, sentAt };
      } catch (err) {
        if (!isDuplicateKey(err)) throw err;
        seq++;
      }
    }
  }

  /**
   * Runs a write of keys or identities between an intent and a done entry in
   * the change feed. Readers stop caching the targets on the intent; the write
   * lands within WRITE_BOUND_MS of the intent or never (it is not sent later
   * than WRITE_BOUND_MS - WRITE_MAX_MS after it, and the server gives it
   * WRITE_MAX_MS); the done entry lets readers cache the targets again at once.
   * A crash or lost connection anywhere leaves at worst an open intent, which
   * readers release after its bound: no revocation is lost.
   */
  async changing<T>(
    targets: ChangeTargets,
    write: (opts: { maxTimeMS: number }, inTime: () => boolean) => Promise<T>,
  ): Promise<T> {
    // The bound runs from the intent's insert: it is visible no earlier than that.
    // An intent whose insert took so long that the write could no longer land
    // within the bound is closed and announced once more (nothing was written
    // yet); a second slow one refuses the write.
    let intent = 0;
    let sentAt = 0;
    const inTime = () => performance.now() - sentAt < WRITE_BOUND_MS - WRITE_MAX_MS;
    // The done entry only shortens how long readers bypass their caches: a failure to write it loses nothing.
    const done = (seq: number) => this.appendChange({ phase: "done", intent: seq, ...targets }).then(
      () => undefined,
      () => undefined,
    );
    for (let attempt = 1; ; attempt++) {
      ({ seq: intent, sentAt } = await this.appendChange({ phase: "intent", boundMs: WRITE_BOUND_MS, ...targets }));
      if (inTime()) break;
      await done(intent);
      if (attempt === 2) throw new UnavailableError("the change feed answered too slowly; nothing was written");
    }
    let res: T;
    try {
      res = await write({ maxTimeMS: WRITE_MAX_MS }, inTime);
    } catch (err) {
      // A refusal by the server wrote nothing; after a lost connection the write may still land, so the intent stays open.
      if (err instanceof MongoServerError) await done(intent);
      throw err;
    }
    await done(intent);
    return res;
  }
}
