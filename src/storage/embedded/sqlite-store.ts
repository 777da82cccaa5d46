import Database from "better-sqlite3";
import { mkdirSync } from "node:fs";
import { dirname } from "node:path";
import { AlreadyExistsError, FailedPreconditionError, UnavailableError } from "../../domain/errors.js";
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
import { applyCreditsOp, spendFromBalance } from "../../domain/credits.js";
import { InvalidArgumentError } from "../../domain/errors.js";
import { BUCKET_MS, type Counts, type UsageQuery, type UsageRow } from "../../domain/usage.js";
import { asStoreError } from "./sqlite-errors.js";
import { UsageWriter } from "./usage-writer.js";
import { COUNTER_COLUMNS, usageRollup, WATERMARK, WATERMARK_INIT, type UsageRollup } from "./usage-rollup.js";
import type { Change, ChangeTargets, KeyFilter, PageQuery, CommitSignal, RefillDue, SpendResult, Store, StoreCapabilities } from "../store.js";

const SCHEMA = `
CREATE TABLE IF NOT EXISTS identities (
  id TEXT PRIMARY KEY,
  external_id TEXT NOT NULL UNIQUE,
  doc TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS keys (
  id TEXT PRIMARY KEY,
  api_id TEXT NOT NULL,
  identity_id TEXT,
  hash TEXT NOT NULL UNIQUE,
  doc TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS keys_api ON keys (api_id, id);
CREATE INDEX IF NOT EXISTS keys_identity ON keys (identity_id, id);
CREATE TABLE IF NOT EXISTS root_keys (
  id TEXT PRIMARY KEY,
  hash TEXT NOT NULL UNIQUE,
  doc TEXT NOT NULL
) WITHOUT ROWID;
DROP TABLE IF EXISTS changes;
CREATE TABLE IF NOT EXISTS change_feed (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  at INTEGER NOT NULL,
  targets TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
  g TEXT NOT NULL,
  bucket INTEGER NOT NULL,
  key_id TEXT NOT NULL,
  identity_id TEXT NOT NULL,
  tag TEXT NOT NULL,
  total INTEGER NOT NULL,
  valid INTEGER NOT NULL,
  not_found INTEGER NOT NULL,
  disabled INTEGER NOT NULL,
  expired INTEGER NOT NULL,
  insufficient_permissions INTEGER NOT NULL,
  rate_limited INTEGER NOT NULL,
  usage_exceeded INTEGER NOT NULL,
  credits_spent INTEGER NOT NULL,
  PRIMARY KEY (g, bucket, key_id, identity_id, tag)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_identity ON usage (identity_id, g, bucket);
CREATE INDEX IF NOT EXISTS usage_key ON usage (key_id, g, bucket);
CREATE TABLE IF NOT EXISTS usage_writers (
  writer TEXT PRIMARY KEY,
  seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS settings (
  name TEXT PRIMARY KEY,
  value TEXT NOT NULL
) WITHOUT ROWID;
`;

type Row = { doc: string };

/** How long a write waits for another connection's write lock before answering UNAVAILABLE. */
const BUSY_WAIT_MS = 5000;
/** How many reroll moves a key's balance is followed through. */
const MAX_CREDIT_HOPS = 8;
/** Keys per change row when one operation touches many (DeleteIdentity). */
const TARGETS_PER_CHANGE = 500;

/** A unique index or the primary key (an id already taken) refused the write. */
function isUniqueViolation(err: unknown): boolean {
  const code = typeof err === "object" && err !== null ? (err as { code?: string }).code : undefined;
  return code === "SQLITE_CONSTRAINT_UNIQUE" || code === "SQLITE_CONSTRAINT_PRIMARYKEY";
}

function wrap<T>(fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    if (isUniqueViolation(err)) {
      const msg = String((err as Error).message);
      throw new AlreadyExistsError(msg.includes("external_id") ? "an identity with this external_id already exists" : "already exists");
    }
    throw asStoreError(err as Error & { code?: string });
  }
}

/**
 * The embedded default store: SQLite (better-sqlite3) in WAL mode with
 * synchronous=FULL, so a write is on disk before it is acknowledged and a
 * kill -9 loses nothing. Records are JSON documents beside the indexed columns.
 * better-sqlite3 is synchronous: each method runs in one IMMEDIATE transaction
 * and cannot interleave with another call of this process; other processes
 * (the CLI) are serialised by SQLite's lock. Usage counts and last-used times
 * are the exception: a worker thread writes them (usage-worker.ts), so a flush
 * never blocks the event loop; SQLite's lock serialises it with the rest.
 */
export class SqliteStore implements Store {
  readonly kind = "embedded" as const;
  /** One process owns the file: nothing is shared, and every write is a transaction. */
  readonly capabilities: StoreCapabilities = { shared: false, atomicUpdates: true };
  private db!: Database.Database;
  /** Usage counts and last-used times are written by a worker thread with its own connection. */
  private readonly usage: UsageWriter;
  /** Hour and day usage rows from minute rows, on this connection (pruning, rollUpUsage); the worker runs its own. */
  private rollup!: UsageRollup;

  constructor(private readonly path: string) {
    this.usage = new UsageWriter(path);
  }

  async init(): Promise<void> {
    mkdirSync(dirname(this.path), { recursive: true });
    this.db = new Database(this.path);
    this.db.pragma("journal_mode = WAL");
    this.db.pragma("synchronous = FULL");
    // No busy wait on this connection: it would block the event loop (every call)
    // for as long as another writer — the usage worker, the CLI — holds the write
    // lock. A transaction that finds the lock taken is retried asynchronously (tx).
    this.db.pragma("busy_timeout = 0");
    this.db.exec(SCHEMA);
    // Once per database: a write, so only when missing (the CLI opens the file
    // beside a running server, whose usage worker may hold the write lock), and
    // through tx, which waits for the lock.
    if (!this.db.prepare("SELECT 1 FROM settings WHERE name = ?").get(WATERMARK)) await this.tx(() => this.db.exec(WATERMARK_INIT));
    this.rollup = usageRollup(this.db);
  }

  async ping(): Promise<void> {
    wrap(() => this.stmt("SELECT 1").get());
  }

  async close(): Promise<void> {
    await this.usage.close();
    this.statements.clear();
    if (this.db?.open) this.db.close();
  }

  private readonly statements = new Map<string, Database.Statement>();

  /** Prepared statements are cached: preparing is most of the cost of a point read. */
  private stmt(sql: string): Database.Statement {
    let s = this.statements.get(sql);
    if (!s) {
      s = this.db.prepare(sql);
      this.statements.set(sql, s);
    }
    return s;
  }

  /**
   * Runs `fn` in one IMMEDIATE transaction. When another connection holds the
   * write lock (SQLITE_BUSY), tries again after a short pause, off the event loop,
   * for up to BUSY_WAIT_MS; then UNAVAILABLE. With `signal`, a transaction not yet
   * begun when it aborts is not run: the call rejects with its reason.
   */
  private async tx<T>(fn: () => T, signal?: CommitSignal): Promise<T> {
    const deadline = Date.now() + BUSY_WAIT_MS;
    for (let pause = 1; ; pause = Math.min(pause * 2, 16)) {
      signal?.throwIfAborted();
      try {
        return wrap(() => this.db.transaction(fn).immediate());
      } catch (err) {
        if (!(err instanceof UnavailableError && /SQLITE_BUSY/.test(err.message)) || Date.now() + pause > deadline) throw err;
      }
      await new Promise((r) => setTimeout(r, pause));
    }
  }

  private getDoc<T>(sql: string, ...params: unknown[]): T | null {
    const row = this.stmt(sql).get(...params) as Row | undefined;
    return row ? (JSON.parse(row.doc) as T) : null;
  }

  private allDocs<T>(sql: string, ...params: unknown[]): T[] {
    return (this.stmt(sql).all(...params) as Row[]).map((r) => JSON.parse(r.doc) as T);
  }

  /** Writes an identity and its change; an update raises its version. Returns what was stored. */
  private putIdentity(rec: IdentityRecord, insert: boolean): IdentityRecord {
    const sql = insert
      ? "INSERT INTO identities (id, external_id, doc) VALUES (@id, @externalId, @doc)"
      : "UPDATE identities SET external_id = @externalId, doc = @doc WHERE id = @id";
    const stored = insert ? rec : { ...rec, version: (rec.version ?? 0) + 1 };
    // Named parameters: better-sqlite3 refuses positional values for `?NNN`.
    this.stmt(sql).run({ id: rec.id, externalId: rec.externalId, doc: JSON.stringify(stored) });
    this.recordChange({ keys: [], identities: [rec.id] });
    return stored;
  }

  /** Called inside the writing transaction, so a change is visible with its data (phase "write"). */
  private recordChange(targets: ChangeTargets): void {
    this.stmt("INSERT INTO change_feed (at, targets) VALUES (?, ?)").run(Date.now(), JSON.stringify(targets));
  }

  /** Writes a key (and its change unless `change` is false); an update raises its version. Returns what was stored. */
  private putKey(rec: KeyRecord, insert: boolean, change = true): KeyRecord {
    const sql = insert
      ? "INSERT INTO keys (id, api_id, identity_id, hash, doc) VALUES (@id, @apiId, @identityId, @hash, @doc)"
      : "UPDATE keys SET api_id = @apiId, identity_id = @identityId, hash = @hash, doc = @doc WHERE id = @id";
    const stored = insert ? rec : { ...rec, version: (rec.version ?? 0) + 1 };
    this.stmt(sql).run({ id: rec.id, apiId: rec.apiId, identityId: rec.identityId, hash: rec.hash, doc: JSON.stringify(stored) });
    if (change) this.recordChange({ keys: [{ id: rec.id, hash: rec.hash }], identities: [] });
    return stored;
  }

  async createIdentity(rec: IdentityRecord): Promise<void> {
    await this.tx(() => this.putIdentity(rec, true));
  }

  async ensureIdentity(rec: IdentityRecord): Promise<{ identity: IdentityRecord; created: boolean }> {
    return this.tx(() => {
      const existing = this.getDoc<IdentityRecord>("SELECT doc FROM identities WHERE external_id = ?", rec.externalId);
      if (existing) return { identity: existing, created: false };
      this.putIdentity(rec, true);
      return { identity: rec, created: true };
    });
  }

  async getIdentity(id: string): Promise<IdentityRecord | null> {
    return wrap(() => this.getDoc<IdentityRecord>("SELECT doc FROM identities WHERE id = ?", id));
  }

  async getIdentityByExternalId(externalId: string): Promise<IdentityRecord | null> {
    return wrap(() => this.getDoc<IdentityRecord>("SELECT doc FROM identities WHERE external_id = ?", externalId));
  }

  async getIdentities(ids: string[]): Promise<IdentityRecord[]> {
    if (ids.length === 0) return [];
    return wrap(() =>
      this.allDocs<IdentityRecord>(`SELECT doc FROM identities WHERE id IN (SELECT value FROM json_each(?))`, JSON.stringify(ids)),
    );
  }

  async listIdentities(page: PageQuery, search: string | null): Promise<IdentityRecord[]> {
    return wrap(() =>
      this.allDocs<IdentityRecord>(
        `SELECT doc FROM identities WHERE id > @afterId AND (@search IS NULL OR instr(lower(external_id), lower(@search)) > 0) ORDER BY id LIMIT @limit`,
        { afterId: page.afterId ?? "", search, limit: page.limit },
      ),
    );
  }

  async updateIdentity(id: string, patch: IdentityPatch, now: number): Promise<IdentityRecord | null> {
    return this.tx(() => {
      const cur = this.getDoc<IdentityRecord>("SELECT doc FROM identities WHERE id = ?", id);
      if (!cur) return null;
      return this.putIdentity({ ...cur, ...patch, updatedAt: now }, false);
    });
  }

  async deleteIdentity(id: string, deleteKeys: boolean): Promise<{ deletedKeys: number; unlinkedKeys: number } | null> {
    return this.tx(() => {
      const exists = this.stmt("SELECT 1 FROM identities WHERE id = ?").get(id);
      if (!exists) return null;
      let deletedKeys = 0;
      let unlinkedKeys = 0;
      const keys = this.allDocs<KeyRecord>("SELECT doc FROM keys WHERE identity_id = ?", id);
      if (deleteKeys) {
        deletedKeys = this.stmt("DELETE FROM keys WHERE identity_id = ?").run(id).changes;
      } else {
        for (const k of keys) this.putKey({ ...k, identityId: null }, false, false);
        unlinkedKeys = keys.length;
      }
      this.stmt("DELETE FROM identities WHERE id = ?").run(id);
      // One change row per batch of keys, in the same transaction.
      for (let i = 0; i < keys.length; i += TARGETS_PER_CHANGE) {
        this.recordChange({ keys: keys.slice(i, i + TARGETS_PER_CHANGE).map((k) => ({ id: k.id, hash: k.hash })), identities: [] });
      }
      this.recordChange({ keys: [], identities: [id] });
      return { deletedKeys, unlinkedKeys };
    });
  }

  async createKey(rec: KeyRecord): Promise<void> {
    await this.tx(() => this.putKey(rec, true));
  }

  async getKey(id: string): Promise<KeyRecord | null> {
    return wrap(() => this.withMovedBalance(this.getDoc<KeyRecord>("SELECT doc FROM keys WHERE id = ?", id)));
  }

  async getKeyByHash(hash: string): Promise<KeyRecord | null> {
    return wrap(() => this.withMovedBalance(this.getDoc<KeyRecord>("SELECT doc FROM keys WHERE hash = ?", hash)));
  }

  /**
   * The key that holds the balance `keyId` spends from: itself, or the key its
   * balance moved to by a reroll (followed through a chain). Null when that key
   * is gone — a moved balance whose key was deleted is spent.
   */
  private balanceHolder(keyId: string): { holder: KeyRecord | null; moved: boolean } {
    let rec = this.getDoc<KeyRecord>("SELECT doc FROM keys WHERE id = ?", keyId);
    const moved = !!rec?.creditsKeyId;
    for (let hops = 0; rec?.creditsKeyId && hops < MAX_CREDIT_HOPS; hops++) {
      rec = this.getDoc<KeyRecord>("SELECT doc FROM keys WHERE id = ?", rec.creditsKeyId);
    }
    return { holder: rec?.creditsKeyId ? null : rec, moved };
  }

  /** A key whose balance moved shows the balance it spends from (none left once that key is gone). */
  private withMovedBalance(rec: KeyRecord | null): KeyRecord | null {
    if (!rec?.creditsKeyId) return rec;
    return { ...rec, credits: this.balanceHolder(rec.id).holder?.credits ?? { remaining: 0, refill: null } };
  }

  async listKeys(filter: KeyFilter, page: PageQuery): Promise<KeyRecord[]> {
    return wrap(() =>
      this.allDocs<KeyRecord>(
        `SELECT doc FROM keys WHERE id > @afterId AND (@apiId IS NULL OR api_id = @apiId) AND (@identityId IS NULL OR identity_id = @identityId) ORDER BY id LIMIT @limit`,
        { afterId: page.afterId ?? "", apiId: filter.apiId ?? null, identityId: filter.identityId ?? null, limit: page.limit },
      ).map((k) => this.withMovedBalance(k)!),
    );
  }

  async updateKey(id: string, patch: KeyPatch, now: number): Promise<KeyRecord | null> {
    return this.tx(() => {
      const cur = this.getDoc<KeyRecord>("SELECT doc FROM keys WHERE id = ?", id);
      if (!cur) return null;
      // New credits are the key's own, also for a key whose balance had moved by a reroll.
      const next: KeyRecord = { ...cur, ...patch, updatedAt: now };
      if (patch.credits !== undefined) delete next.creditsKeyId;
      return this.withMovedBalance(this.putKey(next, false))!;
    });
  }

  async deleteKey(id: string): Promise<boolean> {
    return this.tx(() => {
      const cur = this.getDoc<KeyRecord>("SELECT doc FROM keys WHERE id = ?", id);
      if (!cur) return false;
      this.stmt("DELETE FROM keys WHERE id = ?").run(id);
      this.recordChange({ keys: [{ id, hash: cur.hash }], identities: [] });
      return true;
    });
  }

  async rerollKey(oldId: string, next: KeyRecord, oldExpiresAt: number, now: number): Promise<KeyRecord | null> {
    return this.tx(() => {
      const cur = this.getDoc<KeyRecord>("SELECT doc FROM keys WHERE id = ?", oldId);
      if (!cur) return null;
      // The balance moves with the new secret; the old key spends from it until it
      // expires, so the two draw from one balance (one transaction: nothing spent
      // in between).
      const moves = cur.credits !== null && !cur.creditsKeyId;
      const { creditsKeyId: _ignored, ...base } = next;
      // A key that itself spends from another passes that on; else its own balance moves.
      const stored: KeyRecord = cur.creditsKeyId ? { ...base, credits: null, creditsKeyId: cur.creditsKeyId } : { ...base, credits: cur.credits };
      this.putKey(stored, true);
      this.putKey({ ...cur, expiresAt: oldExpiresAt, updatedAt: now, ...(moves ? { credits: null, creditsKeyId: next.id } : {}) }, false);
      return this.withMovedBalance(stored);
    });
  }

  /** The record whose balance `target` spends or changes, for the credit methods below. */
  private creditsRecord(target: CreditsTarget): { rec: KeyRecord | IdentityRecord | null; isKey: boolean; gone: boolean } {
    if ("keyId" in target) {
      const { holder, moved } = this.balanceHolder(target.keyId);
      return { rec: holder, isKey: true, gone: moved && holder === null };
    }
    return { rec: this.getDoc<IdentityRecord>("SELECT doc FROM identities WHERE id = ?", target.identityId), isKey: false, gone: false };
  }

  async updateCredits(target: CreditsTarget, op: CreditsOp, now: number, refill: RefillDue | null): Promise<Credits | null | undefined> {
    return this.tx(() => {
      const { rec, isKey, gone } = this.creditsRecord(target);
      if (gone) throw new FailedPreconditionError("this key's balance moved to a key that was deleted");
      if (!rec) return undefined;
      const credits = applyCreditsOp(rec.credits, op, refill);
      if (isKey) this.putKey({ ...(rec as KeyRecord), credits, updatedAt: now }, false);
      else this.putIdentity({ ...(rec as IdentityRecord), credits, updatedAt: now }, false);
      return credits;
    });
  }

  async spendCredits(target: CreditsTarget, cost: number, refill: RefillDue | null, signal?: CommitSignal): Promise<SpendResult> {
    return this.tx(() => {
      const { rec, isKey, gone } = this.creditsRecord(target);
      if (gone) return { ok: false, remaining: 0 };
      if (!rec || !rec.credits) return { ok: true as const, remaining: null };
      const { ok, credits, changed } = spendFromBalance(rec.credits, cost, refill);
      if (changed) {
        // Balance-only writes skip the change feed: cached records never decide on the balance.
        const doc = JSON.stringify({ ...rec, credits });
        if (isKey) this.stmt("UPDATE keys SET doc = ? WHERE id = ?").run(doc, rec.id);
        else this.stmt("UPDATE identities SET doc = ? WHERE id = ?").run(doc, rec.id);
      }
      return { ok, remaining: credits.remaining, refilledAt: credits.refill?.lastRefillAt ?? null };
    }, signal);
  }

  async returnCredits(target: CreditsTarget, cost: number, refilledAt: number | null): Promise<boolean> {
    return this.tx(() => {
      const { rec, isKey } = this.creditsRecord(target);
      if (!rec?.credits || (rec.credits.refill?.lastRefillAt ?? null) !== refilledAt) return false;
      const credits = { ...rec.credits, remaining: Math.min(rec.credits.remaining + cost, Number.MAX_SAFE_INTEGER) };
      const doc = JSON.stringify({ ...rec, credits });
      if (isKey) this.stmt("UPDATE keys SET doc = ? WHERE id = ?").run(doc, rec.id);
      else this.stmt("UPDATE identities SET doc = ? WHERE id = ?").run(doc, rec.id);
      return true;
    });
  }

  async changesSince(afterSeq: number, limit: number): Promise<Change[]> {
    return wrap(() =>
      (this.stmt("SELECT seq, targets FROM change_feed WHERE seq > ? ORDER BY seq LIMIT ?").all(afterSeq, limit) as { seq: number; targets: string }[]).map(
        (r) => ({ seq: r.seq, phase: "write" as const, ...(JSON.parse(r.targets) as ChangeTargets) }),
      ),
    );
  }

  async changeFeedStart(): Promise<number> {
    return wrap(() => {
      const oldest = (this.stmt("SELECT min(seq) AS seq FROM change_feed").get() as { seq: number | null }).seq;
      return oldest !== null ? oldest - 1 : this.newestSeq();
    });
  }

  /** The newest seq ever issued (AUTOINCREMENT remembers it after its row is pruned). */
  private newestSeq(): number {
    const row = this.stmt("SELECT seq FROM sqlite_sequence WHERE name = 'change_feed'").get() as { seq: number } | undefined;
    return row?.seq ?? 0;
  }

  async lastChangeSeq(): Promise<number> {
    return wrap(() => this.newestSeq());
  }

  async pruneChanges(beforeSeq: number): Promise<void> {
    await this.tx(() => this.stmt("DELETE FROM change_feed WHERE seq < ?").run(beforeSeq));
  }

  async writeUsage(rows: UsageRow[], batch: { writer: string; seq: number }): Promise<void> {
    await this.usage.writeUsage(rows, batch);
  }

  async queryUsage(q: UsageQuery): Promise<UsageRow[]> {
    const byIdentity = "identityId" in q.by;
    const id = "identityId" in q.by ? q.by.identityId : q.by.keyId;
    const where = `${byIdentity ? "identity_id" : "key_id"} = ? AND g = ? AND bucket >= ? AND bucket < ? AND ${q.tagged ? "tag <> ''" : "tag = ''"}`;
    let raw: Record<string, number | string>[];
    if (q.granularity === "minute") {
      raw = wrap(() => this.stmt(`SELECT * FROM usage WHERE ${where} ORDER BY bucket LIMIT ?`).all(id, "minute", q.start, q.end, q.maxRows + 1)) as typeof raw;
    } else {
      // Hour and day rows, plus the minute rows from the watermark on, which
      // are not in them yet (usage-rollup.ts): one statement, one snapshot.
      // A minute counts in the bucket it falls in; that bucket is in [start, end)
      // when the minute is in [start, end), each rounded up to the bucket size.
      const size = BUCKET_MS[q.granularity];
      const up = (t: number) => Math.ceil(t / size) * size;
      const cols = COUNTER_COLUMNS.join(", ");
      const sql = `SELECT bucket, key_id, identity_id, tag, ${COUNTER_COLUMNS.map((c) => `sum(${c}) AS ${c}`).join(", ")} FROM (
          SELECT bucket, key_id, identity_id, tag, ${cols} FROM usage WHERE ${where}
          UNION ALL
          SELECT bucket - bucket % ${size}, key_id, identity_id, tag, ${cols} FROM usage
            WHERE ${where.replace("bucket >= ?", `bucket >= max(?, (SELECT CAST(value AS INTEGER) FROM settings WHERE name = '${WATERMARK}'))`)}
        ) GROUP BY bucket, key_id, identity_id, tag ORDER BY bucket LIMIT ?`;
      raw = wrap(() => this.stmt(sql).all(id, q.granularity, q.start, q.end, id, "minute", up(q.start), up(q.end), q.maxRows + 1)) as typeof raw;
    }
    if (raw.length > q.maxRows) throw new InvalidArgumentError("start_time", "the range holds too many rows for this breakdown; narrow it or use a coarser granularity");
    return raw.map((r) => ({
      granularity: q.granularity,
      bucket: r.bucket as number,
      keyId: r.key_id as string,
      identityId: (r.identity_id as string) || null,
      tag: r.tag as string,
      counts: {
        total: r.total,
        valid: r.valid,
        notFound: r.not_found,
        disabled: r.disabled,
        expired: r.expired,
        insufficientPermissions: r.insufficient_permissions,
        rateLimited: r.rate_limited,
        usageExceeded: r.usage_exceeded,
        creditsSpent: r.credits_spent,
      } as Counts,
    }));
  }

  /**
   * Sums the minute rows of minutes over by a minute into their hour and day
   * rows now (the usage worker does it with its writes; this is for pruning,
   * tests and an instance that stopped writing). Returns the watermark after.
   */
  async rollUpUsage(now = Date.now()): Promise<number> {
    return this.tx(() => this.rollup.rollUp(now));
  }

  async touchLastUsed(times: Map<string, number>): Promise<void> {
    await this.usage.touchLastUsed(times);
  }

  async pruneUsage(granularity: "minute" | "hour" | "day", before: number): Promise<void> {
    await this.tx(() => {
      // Minute rows not yet summed into their hour and day rows are rolled up first.
      const rolledUpTo = granularity === "minute" ? this.rollup.rollUp(Date.now()) : Infinity;
      this.stmt("DELETE FROM usage WHERE g = ? AND bucket < ?").run(granularity, Math.min(before, rolledUpTo));
    });
  }

  async createRootKey(rec: RootKeyRecord): Promise<void> {
    await this.tx(() => this.stmt("INSERT INTO root_keys (id, hash, doc) VALUES (?, ?, ?)").run(rec.id, rec.hash, JSON.stringify(rec)));
  }

  async getRootKeyByHash(hash: string): Promise<RootKeyRecord | null> {
    return wrap(() => this.getDoc<RootKeyRecord>("SELECT doc FROM root_keys WHERE hash = ?", hash));
  }

  async listRootKeys(): Promise<RootKeyRecord[]> {
    return wrap(() => this.allDocs<RootKeyRecord>("SELECT doc FROM root_keys ORDER BY id"));
  }

  async deleteRootKey(id: string): Promise<boolean> {
    return this.tx(() => this.stmt("DELETE FROM root_keys WHERE id = ?").run(id).changes > 0);
  }

  async createFirstRootKey(rec: RootKeyRecord): Promise<boolean> {
    return this.tx(() => {
      const marked = this.stmt("INSERT OR IGNORE INTO settings (name, value) VALUES ('bootstrapped', ?)").run(String(rec.createdAt));
      if (marked.changes === 0) return false;
      this.stmt("INSERT INTO root_keys (id, hash, doc) VALUES (?, ?, ?)").run(rec.id, rec.hash, JSON.stringify(rec));
      return true;
    });
  }
}
