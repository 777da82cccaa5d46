import { createHash } from "node:crypto";
import type { Collection } from "mongodb";
import { InvalidArgumentError } from "../../domain/errors.js";
import { BUCKET_MS, COUNTERS, emptyCounts, type Counts, type Granularity, type UsageQuery, type UsageRow } from "../../domain/usage.js";
import { isDuplicateCode, isDuplicateKey } from "./errors.js";
import type { MongoContext } from "./context.js";
import type { Slot } from "./usage-slots.js";
import type { UsageDoc, UsageLogDoc, UsageLogRow as LogRow, UsagePackDoc, UsagePackRow } from "./documents.js";

/** A document holding versions of rows: a pack, or a single-row version from before packs. */
type VersionDoc = { id: string; g: string; b: number; seq: number; single: boolean };

/**
 * Rows of one writer slot by granularity, bucket and row key (`rowKey`): a
 * roll-up looks each log row up three times (its minute, hour and day rows),
 * with one short key made once per log row, where a whole row id per lookup
 * was most of the roll-up's time (docs/performance.md, step 8j).
 */
type SlotRows<T> = Map<string, Map<number, Map<string, T>>>;
/** A row version: the row and the seq of the version (or of the roll-up) it is from. */
type Versioned = { row: UsageRow; seq: number };
/** A row within its granularity and bucket: key, identity and tag. */
const rowKey = (keyId: string, identityId: string | null, tag: string) => `${keyId}|${identityId ?? ""}|${tag}`;

function rowsIn<T>(rows: SlotRows<T>, g: string, b: number, create: true): Map<string, T>;
function rowsIn<T>(rows: SlotRows<T>, g: string, b: number, create?: false): Map<string, T> | undefined;
function rowsIn<T>(rows: SlotRows<T>, g: string, b: number, create = false): Map<string, T> | undefined {
  let byBucket = rows.get(g);
  if (!byBucket) {
    if (!create) return undefined;
    rows.set(g, (byBucket = new Map()));
  }
  let m = byBucket.get(b);
  if (!m && create) byBucket.set(b, (m = new Map()));
  return m;
}

/**
 * A roll-up takes in tens of thousands of log rows (30 s of flushes under load);
 * it lets the event loop run verifications between slices of this many, and
 * between log documents, instead of holding it for the whole roll-up (hundreds
 * of milliseconds; docs/performance.md, step 8j). Inserts and roll-ups still
 * take turns (exclusive), so nothing else touches the slot meanwhile.
 */
const ROLLUP_SLICE = 2000;
const breather = () => new Promise<void>((go) => setImmediate(go));

/** Rows per usage log document (a batch larger than this is written as several parts). */
const LOG_ROWS_PER_DOC = 5000;
/** Default: how often a process applies its writer slot's log to the rows. */
export const DEFAULT_USAGE_ROLLUP_MS = 30_000;

const rowId = (slot: string, r: { granularity: string; bucket: number; keyId: string; identityId: string | null; tag: string }) =>
  `${slot}|${r.granularity}|${r.bucket}|${r.keyId}|${r.identityId ?? ""}|${r.tag}`;

/** Counters as stored in the log and in packs: a list in COUNTERS order (FerretDB 1.x stores no arrays of arrays). */
const countList = (c: Counts): number[] => COUNTERS.map((n) => c[n]);

function countsOf(n: number[]): Counts {
  const counts = {} as Counts;
  COUNTERS.forEach((c, i) => (counts[c] = n[i] ?? 0));
  return counts;
}

/** The identities and keys `rows` count: what a read by identity or key finds a log document or a pack by. */
function idLists(rows: UsageRow[]): { i: string[]; k: string[] } {
  const i = new Set<string>();
  const k = new Set<string>();
  for (const r of rows) {
    if (r.identityId !== null) i.add(r.identityId);
    k.add(r.keyId);
  }
  return { i: [...i], k: [...k] };
}

function toLogRow(r: UsageRow): LogRow {
  return { g: r.granularity, b: r.bucket, k: r.keyId, i: r.identityId, t: r.tag, n: countList(r.counts) };
}

/** A log document of minute `rows` (usage_log): the rows as JSON text, and the identities and keys they count. */
function toLogDoc(_id: string, slot: string, seq: number, rows: UsageRow[]): UsageLogDoc {
  return { _id, slot, seq, m: 1, ...idLists(rows), data: JSON.stringify(rows.map(toLogRow)) };
}

/** A log document's rows as stored: minute rows (`m`), or rows of every granularity in documents of earlier releases (`data`, or `rows` before it). */
function parseLog(d: UsageLogDoc): { minute: boolean; rows: LogRow[] } {
  return { minute: d.m === 1, rows: d.data !== undefined ? (JSON.parse(d.data) as LogRow[]) : (d.rows ?? []) };
}

/**
 * Calls `fn` for each row that stored rows `from`–`to` of a log document count
 * in: a minute row counts in its minute, hour and day buckets (three calls with
 * the same row), a row of an earlier release's document in its own.
 */
function eachCounted(log: { minute: boolean; rows: LogRow[] }, fn: (g: Granularity, b: number, r: LogRow) => void, from = 0, to = log.rows.length): void {
  const end = Math.min(to, log.rows.length);
  for (let i = from; i < end; i++) {
    const r = log.rows[i];
    if (!log.minute) {
      fn(r.g as Granularity, r.b, r);
      continue;
    }
    fn("minute", r.b, r);
    fn("hour", r.b - (r.b % BUCKET_MS.hour), r);
    fn("day", r.b - (r.b % BUCKET_MS.day), r);
  }
}

/** The rows a log document counts (eachCounted), as rows; not summed here: every reader adds up the rows of one id. */
function logRows(d: UsageLogDoc): LogRow[] {
  const log = parseLog(d);
  if (!log.minute) return log.rows;
  const out: LogRow[] = [];
  eachCounted(log, (g, b, r) => out.push(g === "minute" ? r : { ...r, g, b }));
  return out;
}

/** Rows a usage pack holds at most: a roll-up writes each bucket's rows of its slot as packs of this many. */
const PACK_ROWS = 200;
/**
 * How long the timer's roll-ups leave the older versions' packs they replaced
 * before deleting them together, and how many they leave at most (rollUp).
 */
const SUPERSEDED_DELETE_MS = 600_000;
const SUPERSEDED_MAX = 5_000;

/**
 * A bucket's rows as packs: sorted by identity, key and tag (so the rows of one
 * identity or key sit in one pack or neighbouring ones), `size` a pack, under
 * `_id`s that depend only on the slot, bucket, seq, the packs' content
 * (`digest`) and the position — a roll-up run again writes the same packs, and
 * one that came to other counts under the same seq (a slot whose seqs began
 * again) never collides with them.
 */
function toPacks(slot: string, rows: UsageRow[], seq: number, size: number): { doc: UsagePackDoc; rows: number }[] {
  const order = (r: UsageRow) => `${r.identityId ?? ""}\u0000${r.keyId}\u0000${r.tag}`;
  const sorted = rows.map((r) => ({ r, o: order(r) })).sort((x, y) => (x.o < y.o ? -1 : x.o > y.o ? 1 : 0));
  const { granularity: g, bucket: b } = rows[0];
  const out: { doc: UsagePackDoc; rows: number }[] = [];
  for (let i = 0, n = 0; i < sorted.length; i += size, n++) {
    const part = sorted.slice(i, i + size).map(({ r }) => r);
    const doc: UsagePackDoc = {
      _id: `${slot}|${g}|${b}#${seq}|${n}`,
      s: slot,
      g,
      b,
      seq,
      ...idLists(part),
      data: JSON.stringify(part.map((r): UsagePackRow => ({ k: r.keyId, i: r.identityId, t: r.tag, n: countList(r.counts) }))),
    };
    out.push({ doc, rows: part.length });
  }
  return out;
}

/** The rows of a pack (JSON text). */
function packRows(d: UsagePackDoc): UsagePackRow[] {
  return JSON.parse(d.data) as UsagePackRow[];
}

function fromPackRow(d: UsagePackDoc, p: UsagePackRow): UsageRow {
  return { granularity: d.g as Granularity, bucket: d.b, keyId: p.k, identityId: p.i ?? null, tag: p.t, counts: countsOf(p.n) };
}

function fromRowDoc(d: UsageDoc): UsageRow {
  const counts = {} as Counts;
  for (const c of COUNTERS) counts[c] = d[c] ?? 0;
  // `i ?? null`: FerretDB leaves a null out of $setOnInsert.
  return { granularity: d.g as Granularity, bucket: d.b, keyId: d.k, identityId: d.i ?? null, tag: d.tag, counts };
}

function fromLogRow(l: LogRow): UsageRow {
  // `i ?? null`: FerretDB may leave a null out.
  return { granularity: l.g as Granularity, bucket: l.b, keyId: l.k, identityId: l.i ?? null, tag: l.t, counts: countsOf(l.n) };
}

/**
 * Usage on MongoDB: a flush is one insert into a log, and a roll-up applies the
 * log to the rows every `usageRollupMs` (the store's timer, mongo-store.ts;
 * docs/usage-storage.md).
 *
 * A flush (writeUsage) inserts its batch as a log document (`<slot>|<seq>|<part>`)
 * of the writer slot the process leases (usage-slots.ts): one insert, however
 * many keys the batch counted — where writing each row was one upsert per key
 * and granularity, and on FerretDB ~3/4 of its CPU per verification under load
 * (docs/performance.md, step 8d). A retried batch inserts the same `_id`s: what
 * landed before is a duplicate and skipped, so it is logged once.
 *
 * The roll-up (rollSlot) writes every row of the slot in the buckets the log
 * touches again as a new version, in packs of up to PACK_ROWS rows a document,
 * and then deletes the older versions' packs and the log documents it took
 * in — inserts, and deletes by `_id`: no update, so FerretDB does not scan a
 * collection per row. A roll-up stopped
 * anywhere, by a failure or a crash, is finished by running it again, here or
 * by whoever leases the slot next.
 *
 * Reads (queryUsage) take each row's newest version and add the log documents
 * not yet taken in: a log row counts unless its row's newest version has a seq
 * at or above the document's. The log is read before the rows, so a roll-up
 * between the two reads shows up in the rows and is not counted twice.
 */
export class MongoUsage {
  /** Recorder writers this process wrote for (their slots are rolled up). */
  private readonly writers = new Set<string>();
  /** Per slot, the seq of the last batch this process sent: sending it again is a retry. */
  private readonly sent = new Map<string, number>();
  /**
   * Per slot, a batch whose insert failed: some of its documents may have landed.
   * A roll-up leaves documents from this seq on in the log until the retry
   * has inserted the rest (deleting them would let the retry insert them again).
   */
  private readonly inDoubt = new Map<string, number>();
  /**
   * Per slot, the rows this process knows: every row of the slot from bucket
   * `from[g]` on, and the packs holding them, as its last completed roll-up left them, under the lease that
   * began at `base` — so the next roll-up need not read them back (on FerretDB
   * a scan of the usage collection per granularity). Dropped by anything that
   * may change them behind it: a roll-up that fails, a prune, another lease.
   */
  private readonly known = new Map<string, { base: number; from: Map<string, number>; rows: SlotRows<Versioned>; docs: VersionDoc[] }>();
  private rolling: Promise<void> | null = null;
  /**
   * Older versions' packs that the timer's roll-ups replaced and left for a
   * later delete, and when the oldest of them was left (see rollUp).
   */
  private readonly superseded = new Set<string>();
  /** Per granularity, the bucket line of this process's last prune (see pruneUsage). */
  private readonly prunedTo = new Map<Granularity, number>();
  private supersededAt = 0;
  /** Inserts and roll-ups one at a time: a roll-up never sees half of a batch's documents. */
  private tail: Promise<unknown> = Promise.resolve();

  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.tail.then(fn, fn);
    this.tail = p.catch(() => undefined);
    return p;
  }

  constructor(private readonly ctx: MongoContext) {}

  /** Minute rows: their hour and day rows are derived where the log is read (logRows). */
  async writeUsage(rows: UsageRow[], batch: { writer: string; seq: number }): Promise<void> {
    if (rows.length === 0) return;
    let oldest = Infinity;
    for (const r of rows) {
      if (r.granularity !== "minute") throw new Error(`the MongoDB store derives ${r.granularity} rows itself; writeUsage takes minute rows`);
      if (r.bucket < oldest) oldest = r.bucket;
    }
    // Rows below a line pruned already: the next prune of that granularity runs again.
    for (const [g, line] of this.prunedTo) if (oldest < line * BUCKET_MS[g]) this.prunedTo.delete(g);
    return this.exclusive(() => this.logBatch(rows, batch));
  }

  private async logBatch(rows: UsageRow[], batch: { writer: string; seq: number }): Promise<void> {
    const slot = await this.ctx.run(() => this.ctx.usageSlots.slotFor(batch.writer));
    this.writers.add(batch.writer);
    const seq = slot.rowSeq(batch.seq);
    const docs: UsageLogDoc[] = [];
    for (let i = 0, part = 0; i < rows.length; i += LOG_ROWS_PER_DOC, part++) {
      docs.push(toLogDoc(`${slot.id}|${seq}|${part}`, slot.id, seq, rows.slice(i, i + LOG_ROWS_PER_DOC)));
    }
    if (this.sent.get(slot.id) !== seq) {
      this.sent.set(slot.id, seq);
      this.inDoubt.set(slot.id, seq);
      await this.insertLog(docs);
      this.inDoubt.delete(slot.id);
    } else {
      // Sent before (a retry): what landed of it is either still in the log, or
      // was rolled up (a batch in doubt stays in the log, so then the whole batch
      // had landed, and its rows have a version at or above this seq).
      const present = await this.ctx.run(() => this.ctx.usageLog.find({ slot: slot.id, seq }).toArray());
      if (present.length > 0) {
        const have = new Set(present.flatMap((d) => logRows(d).map((l) => rowId(slot.id, fromLogRow(l)))));
        const missing = rows.filter((r) => !have.has(rowId(slot.id, r)));
        const attempt = present.length;
        const more: UsageLogDoc[] = [];
        for (let i = 0, part = 0; i < missing.length; i += LOG_ROWS_PER_DOC, part++) {
          more.push(toLogDoc(`${slot.id}|${seq}|r${attempt}.${part}`, slot.id, seq, missing.slice(i, i + LOG_ROWS_PER_DOC)));
        }
        this.inDoubt.set(slot.id, seq);
        if (more.length > 0) await this.insertLog(more);
        this.inDoubt.delete(slot.id);
      } else if (!(await this.rolledPast(slot.id, rows[0], seq))) {
        // Not in the log and not rolled up (a roll-up takes a batch whole): it never landed.
        this.inDoubt.set(slot.id, seq);
        await this.insertLog(docs);
        this.inDoubt.delete(slot.id);
      }
    }
    // Before the next batch: a new owner of the slot starts past this seq.
    await this.ctx.run(() => this.ctx.usageSlots.applied(slot, seq));
  }

  /** A retried batch: the parts that landed before are duplicates, and skipped. */
  private insertLog(docs: UsageLogDoc[]): Promise<void> {
    return this.insertSkippingDuplicates(this.ctx.usageLog, docs);
  }

  /**
   * Applies the log of every slot this process writes with to the rows (one
   * roll-up at a time; a call during one waits for it and runs another).
   *
   * `deferDeletes` (the store's timer): the older versions' packs each roll-up
   * replaces are deleted together every SUPERSEDED_DELETE_MS (or once
   * SUPERSEDED_MAX wait), not by every roll-up — on FerretDB a delete by `_id`
   * is a pass over the whole usage collection, whose cost grows with the history
   * kept (docs/usage-storage.md, "Deletes on FerretDB"). Until then readers see
   * two versions of a row and take the newer, as they do between a roll-up's
   * insert and its delete. An explicit roll-up (rollUpUsage), pruning and close
   * delete them at once.
   */
  async rollUp(opts: { deferDeletes?: boolean } = {}): Promise<void> {
    while (this.rolling) await this.rolling.catch(() => undefined);
    this.rolling = (async () => {
      for (const writer of this.writers) {
        await this.exclusive(async () => {
          const slot = await this.ctx.run(() => this.ctx.usageSlots.slotFor(writer));
          await this.rollSlot(slot);
        });
      }
      const due = this.superseded.size >= SUPERSEDED_MAX || performance.now() - this.supersededAt >= (this.ctx.opts.usageSupersededDeleteMs ?? SUPERSEDED_DELETE_MS);
      if (this.superseded.size > 0 && (!opts.deferDeletes || due)) await this.deleteSuperseded();
    })().finally(() => {
      this.rolling = null;
    });
    return this.rolling;
  }

  /**
   * Rolls the slot's log up: every row of the slot in the buckets the log
   * touches is written again as a new version under the newest seq among the
   * log documents — its newest version plus the log rows of documents above
   * that version's seq — in packs (a few hundred rows a document, one bucket
   * each); then the older versions' packs and the log documents are deleted
   * by their `_id`s. Inserts and deletes by `_id` only, no update: on FerretDB
   * the roll-up's cost is in the bytes it writes and one pass over the packs
   * and the log to delete, not in a scan per row (docs/usage-storage.md). A roll-up stopped anywhere is finished by
   * running it again (here or by the slot's next owner): its packs come out
   * the same — the same rows, in the same order, under the same `_id`s — so
   * those inserted before are duplicates and skipped.
   */
  private async rollSlot(slot: Slot): Promise<void> {
    const doubt = this.inDoubt.get(slot.id) ?? Infinity;
    const docs = (await this.ctx.run(() => this.ctx.usageLog.find({ slot: slot.id }).toArray())).filter((d) => d.seq < doubt);
    if (docs.length === 0) return;
    const seq = Math.max(...docs.map((d) => d.seq));
    // The log's rows, and per granularity the oldest bucket they count in.
    const logs: { seq: number; minute: boolean; rows: LogRow[] }[] = [];
    const since = new Map<string, number>();
    const touch = (g: string, b: number) => {
      const have = since.get(g);
      if (have === undefined || b < have) since.set(g, b);
    };
    for (const d of docs) {
      const log = { seq: d.seq, ...parseLog(d) };
      logs.push(log);
      eachCounted(log, touch);
      await breather();
    }
    const base = slot.rowSeq(0);
    const k = this.known.get(slot.id);
    this.known.delete(slot.id); // until this roll-up completes
    const covered = !!k && k.base === base && [...since].every(([g, b]) => (k.from.get(g) ?? Infinity) <= b);
    const inRange = (g: string, b: number) => since.has(g) && b >= since.get(g)!;
    // Every row of the slot from `since` on: its newest version (what this process's last roll-up left, or read back).
    const { rows: newest, docs: old } = covered ? { rows: k!.rows, docs: k!.docs.filter((d) => inRange(d.g, d.b)) } : await this.versions(slot.id, since);
    // The new version of each row: its newest version plus the log rows of documents above that version's seq.
    const after: SlotRows<Versioned & { from: number }> = new Map();
    const add = (g: Granularity, b: number, key: string, r: LogRow, from: number) => {
      const m = rowsIn(after, g, b, true);
      let e = m.get(key);
      if (!e) {
        const have = rowsIn(newest, g, b)?.get(key);
        const row: UsageRow = { granularity: g, bucket: b, keyId: r.k, identityId: r.i ?? null, tag: r.t, counts: have ? { ...have.row.counts } : emptyCounts() };
        m.set(key, (e = { row, seq: Math.max(seq, have?.seq ?? -1), from: have?.seq ?? -1 }));
      }
      if (from > e.from) {
        const c = e.row.counts;
        for (let j = 0; j < COUNTERS.length; j++) c[COUNTERS[j]] += r.n[j] ?? 0;
      }
    };
    for (const l of logs) {
      // One row key per log row, for its minute, hour and day rows alike.
      let last: LogRow | null = null;
      let key = "";
      const count = (g: Granularity, b: number, r: LogRow) => {
        // `i ?? null`: FerretDB may leave a null out.
        if (r !== last) key = rowKey(r.k, r.i ?? null, r.t);
        last = r;
        add(g, b, key, r, l.seq);
      };
      for (let i = 0; i < l.rows.length; i += ROLLUP_SLICE) {
        eachCounted(l, count, i, i + ROLLUP_SLICE);
        await breather();
      }
    }
    // Rows in those buckets the log did not count: written again as they are.
    for (const [g, byBucket] of newest) {
      for (const [b, rows] of byBucket) {
        if (!inRange(g, b)) continue;
        const m = rowsIn(after, g, b, true);
        for (const [key, have] of rows) {
          if (!m.has(key)) m.set(key, { row: { ...have.row, counts: { ...have.row.counts } }, seq: Math.max(seq, have.seq), from: have.seq });
        }
      }
    }
    const chunkRows = this.ctx.opts.usageRollupChunk ?? 500;
    const packSize = Math.min(PACK_ROWS, chunkRows);
    const made: { doc: UsagePackDoc; rows: number }[] = [];
    for (const byBucket of after.values()) {
      for (const rows of byBucket.values()) {
        const list: UsageRow[] = [];
        for (const e of rows.values()) list.push(e.row);
        for (const m of toPacks(slot.id, list, seq, packSize)) made.push(m);
        await breather();
      }
    }
    const packs = made.map((m) => m.doc);
    const hash = createHash("sha256");
    for (const p of packs) hash.update(p._id).update("\u0000").update(p.data).update("\u0000");
    const digest = hash.digest("base64url").slice(0, 16);
    for (const p of packs) p._id = `${p._id}|${digest}`;
    const perInsert = Math.max(1, Math.floor(chunkRows / packSize));
    let applied = 0;
    for (let i = 0; i < made.length; i += perInsert) {
      const chunk = made.slice(i, i + perInsert);
      await this.insertPacks(chunk.map((m) => m.doc));
      applied += chunk.reduce((n, m) => n + m.rows, 0);
      await this.ctx.opts.usageRollupAfterChunk?.(applied);
    }
    // Left for a later delete (see rollUp): readers take the newest version of a row.
    if (this.superseded.size === 0) this.supersededAt = performance.now();
    for (const d of old) if (d.seq < seq && !d.single) this.superseded.add(d.id);
    // Single-row versions from before packs: one range delete per granularity, once.
    for (const g of new Set(old.filter((d) => d.seq < seq && d.single).map((d) => d.g))) {
      await this.ctx.run(() => this.ctx.usage.deleteMany({ g, b: { $gte: since.get(g)! }, s: slot.id, seq: { $lt: seq }, data: { $exists: false } }));
    }
    await this.deleteByIds(this.ctx.usageLog, docs.map((d) => d._id));
    this.known.set(slot.id, { base, from: since, rows: after, docs: packs.map((p) => ({ id: p._id, g: p.g, b: p.b, seq, single: false })) });
  }

  /** The newest version of each row of the slot from bucket `since[g]` on, per granularity, and the documents holding versions there. */
  private async versions(slot: string, since: Map<string, number>): Promise<{ rows: SlotRows<Versioned>; docs: VersionDoc[] }> {
    const newest: SlotRows<Versioned> = new Map();
    const held: VersionDoc[] = [];
    const offer = (row: UsageRow, v: number) => {
      const m = rowsIn(newest, row.granularity, row.bucket, true);
      const key = rowKey(row.keyId, row.identityId, row.tag);
      const have = m.get(key);
      if (!have || have.seq < v) m.set(key, { row, seq: v });
    };
    for (const [g, b] of since) {
      // `s: null`: rows written before versions carry no slot (their _id starts with it).
      const docs = await this.ctx.run(() => this.ctx.usage.find({ s: { $in: [slot, null] as string[] }, g, b: { $gte: b } }).toArray());
      for (const d of docs) {
        if (d.data !== undefined) {
          if (d.s !== slot) continue;
          held.push({ id: d._id, g: d.g, b: d.b, seq: d.seq, single: false });
          for (const pr of packRows(d)) offer(fromPackRow(d, pr), d.seq);
          continue;
        }
        const id = d.r ?? String(d._id);
        if (!id.startsWith(`${slot}|`)) continue;
        if (d.s === slot) held.push({ id: d._id, g: d.g, b: d.b, seq: d.seq ?? 0, single: true });
        offer(fromRowDoc(d), d.seq ?? 0);
      }
    }
    return { rows: newest, docs: held };
  }

  /** Deletes the older versions' packs roll-ups left (kept for the next try if the delete fails). */
  private async deleteSuperseded(): Promise<void> {
    const ids = [...this.superseded];
    await this.deleteByIds(this.ctx.usage, ids);
    for (const id of ids) this.superseded.delete(id);
    this.supersededAt = performance.now();
  }

  /** Whether a roll-up took batch `seq` in (its rows have a version at or above it). */
  private async rolledPast(slot: string, r: UsageRow, seq: number): Promise<boolean> {
    const v = await this.versions(slot, new Map([[r.granularity, r.bucket]]));
    return (rowsIn(v.rows, r.granularity, r.bucket)?.get(rowKey(r.keyId, r.identityId, r.tag))?.seq ?? -1) >= seq;
  }

  /** A roll-up run again: the packs it inserted before are duplicates, and skipped. */
  private insertPacks(docs: UsagePackDoc[]): Promise<void> {
    return this.insertSkippingDuplicates(this.ctx.usage as unknown as Collection<UsagePackDoc>, docs);
  }

  /** Inserts `docs`, skipping those whose `_id` is there already (FerretDB ends even an unordered insert at its first error: then the rest one by one). */
  private async insertSkippingDuplicates<T extends { _id: string }>(coll: Collection<T>, docs: T[]): Promise<void> {
    await this.ctx.run(async () => {
      try {
        await coll.insertMany(docs as never, { ordered: false });
      } catch (err) {
        if (!isDuplicateKey(err) && !hasOnlyDuplicates(err)) throw err;
        for (const d of docs) {
          try {
            await coll.insertOne(d as never);
          } catch (e) {
            if (!isDuplicateKey(e)) throw e;
          }
        }
      }
    });
  }

  /**
   * Deletes documents by `_id`, 1,000 a command. FerretDB evaluates `$in` in Go
   * over the collection (one parse of each document), which beats one `_id`
   * statement per document: it pushes each down as an SQL scan that parses
   * every document again (docs/usage-storage.md).
   */
  private async deleteByIds(coll: Collection<UsageLogDoc> | Collection<UsageDoc | UsagePackDoc>, ids: string[]): Promise<void> {
    for (let i = 0; i < ids.length; i += 1000) {
      const chunk = ids.slice(i, i + 1000);
      await this.ctx.run(() => (coll as unknown as Collection<{ _id: string }>).deleteMany({ _id: { $in: chunk } }));
    }
  }

  async queryUsage(q: UsageQuery): Promise<UsageRow[]> {
    const by = q.by;
    const byIdentity = "identityId" in by;
    const want = "identityId" in by ? by.identityId : by.keyId;
    const tagOk = (t: string) => (q.tagged ? t !== "" : t === "");
    // Packs holding a row of this identity or key, and single-row versions from before packs.
    // `i` / `k`: a pack's lists of identities and keys, or a single-row version's own (the same indexes find both).
    const filter: Record<string, unknown> = { ...(byIdentity ? { i: want } : { k: want }), g: q.granularity, b: { $gte: q.start, $lt: q.end } };
    // The log first: a roll-up between the two reads is then seen in the rows (and skipped in the log).
    // Only documents with a row of this identity or key come back (the filter runs in the server).
    const log = await this.ctx.run(() => this.ctx.usageLog.find(byIdentity ? { $or: [{ i: want }, { "rows.i": want }] } : { $or: [{ k: want }, { "rows.k": want }] }).toArray());
    const docs = await this.ctx.run(() => this.ctx.usage.find(filter).limit(q.maxRows + 1).toArray());
    const tooMany = () => new InvalidArgumentError("start_time", "the range holds too many rows for this breakdown; narrow it or use a coarser granularity");
    if (docs.length > q.maxRows) throw tooMany();
    // A row may have several versions for a moment (a roll-up inserts the new one before deleting the old): the newest counts.
    const out = new Map<string, { row: UsageRow; seq: number }>();
    const offer = (id: string, row: UsageRow, v: number) => {
      const have = out.get(id);
      if (!have || have.seq < v) out.set(id, { row, seq: v });
    };
    for (const d of docs) {
      if (d.data === undefined) {
        if (tagOk(d.tag)) offer(d.r ?? String(d._id), fromRowDoc(d), d.seq ?? 0);
        continue;
      }
      for (const p of packRows(d)) {
        if ((byIdentity ? p.i : p.k) !== want || !tagOk(p.t)) continue;
        const row = fromPackRow(d, p);
        offer(rowId(d.s, row), row, d.seq);
      }
      if (out.size > q.maxRows) throw tooMany();
    }
    for (const d of log) {
      for (const l of logRows(d)) {
        if (l.g !== q.granularity || l.b < q.start || l.b >= q.end || (byIdentity ? l.i : l.k) !== want || !tagOk(l.t)) continue;
        const r = fromLogRow(l);
        const id = rowId(d.slot, r);
        const have = out.get(id);
        if (!have) out.set(id, { row: r, seq: -1 });
        else if (have.seq < d.seq) for (const c of COUNTERS) have.row.counts[c] += r.counts[c];
      }
    }
    if (out.size > q.maxRows) throw tooMany();
    return [...out.values()].map((e) => e.row);
  }

  async pruneUsage(granularity: "minute" | "hour" | "day", before: number): Promise<void> {
    // Nothing new to prune until another bucket crosses the line (an hour's rows once an hour,
    // not at every 10-minute prune): on FerretDB each prune is a pass over the usage collection.
    const line = Math.ceil(before / BUCKET_MS[granularity]); // buckets below it: b < before
    if (this.prunedTo.get(granularity) === line) return;
    // This process's log first, so what is pruned is not read back from it.
    await this.rollUp();
    // What the last roll-up left per slot stays good unless it reaches back into what is pruned
    // (forgetting it costs the next roll-up a read of the usage collection per granularity).
    for (const [slot, k] of this.known) if ((k.from.get(granularity) ?? Infinity) < before) this.known.delete(slot);
    await this.ctx.run(() => this.ctx.usage.deleteMany({ g: granularity, b: { $lt: before } }));
    this.prunedTo.set(granularity, line);
  }

  /** Graceful stop: what the log holds is applied (what cannot be is left for the slot's next owner). */
  async close(): Promise<void> {
    await this.rollUp().catch(() => undefined);
  }
}

/** A bulk write error whose every write error is a duplicate key. */
function hasOnlyDuplicates(err: unknown): boolean {
  const writeErrors = (err as { writeErrors?: unknown }).writeErrors;
  const list = (Array.isArray(writeErrors) ? writeErrors : writeErrors ? [writeErrors] : null) as { code?: number; errmsg?: string }[] | null;
  return !!list && list.length > 0 && list.every((e) => isDuplicateCode(e.code, e.errmsg));
}
