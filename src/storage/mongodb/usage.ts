import { InvalidArgumentError } from "../../domain/errors.js";
import { COUNTERS, type Counts, type Granularity, type UsageQuery, type UsageRow } from "../../domain/usage.js";
import { isDuplicateCode, isDuplicateKey } from "./errors.js";
import type { MongoContext } from "./context.js";
import type { Slot } from "./usage-slots.js";
import type { UsageLogDoc, UsageLogRow as LogRow } from "./documents.js";


/** Rows per usage log document (a batch larger than this is written as several parts). */
const LOG_ROWS_PER_DOC = 5000;
/** Default: how often a process applies its writer slot's log to the rows. */
export const DEFAULT_USAGE_ROLLUP_MS = 30_000;

const rowId = (slot: string, r: { granularity: string; bucket: number; keyId: string; identityId: string | null; tag: string }) =>
  `${slot}|${r.granularity}|${r.bucket}|${r.keyId}|${r.identityId ?? ""}|${r.tag}`;

function toLogRow(r: UsageRow): LogRow {
  return { g: r.granularity, b: r.bucket, k: r.keyId, i: r.identityId, t: r.tag, n: COUNTERS.map((c) => r.counts[c]) };
}

function fromLogRow(l: LogRow): UsageRow {
  const counts = {} as Counts;
  COUNTERS.forEach((c, i) => (counts[c] = l.n[i] ?? 0));
  // `i ?? null`: FerretDB may leave a null out.
  return { granularity: l.g as Granularity, bucket: l.b, keyId: l.k, identityId: l.i ?? null, tag: l.t, counts };
}

/**
 * Usage on MongoDB: a flush is one insert into a log, and a roll-up applies the
 * log to the rows every `usageRollupMs` (docs/usage-storage.md).
 *
 * A flush (writeUsage) inserts its batch as a log document (`<slot>|<seq>|<part>`)
 * of the writer slot the process leases (usage-slots.ts): one insert, however
 * many keys the batch counted — where writing each row was one upsert per key
 * and granularity, and on FerretDB ~3/4 of its CPU per verification under load
 * (docs/performance.md, step 8d). A retried batch inserts the same `_id`s: what
 * landed before is a duplicate and skipped, so it is logged once.
 *
 * The roll-up sums the slot's log documents into one increment per row and
 * applies them as the direct writes were applied before: each row carries the
 * seq of the last roll-up (or batch) applied to it; a roll-up's first sending
 * filters by `_id` alone, a retry of one that failed half-way only matches rows
 * below its seq. Then it deletes the documents it applied. A process that
 * crashed in between leaves log documents behind; whoever leases the slot next
 * applies them one seq at a time under the seq condition (rows the crashed
 * roll-up reached carry its seq, which is not below theirs) and deletes them.
 *
 * Reads (queryUsage) add the log documents not yet applied: a log row counts
 * unless its row already carries a seq at or above the document's. The log is
 * read before the rows, so a roll-up between the two reads shows up in the rows
 * and is not counted twice.
 */
export class MongoUsage {
  /** Per slot, the row seq of the last roll-up this process sent (a retry of it uses the seq condition). */
  private readonly attempted = new Map<string, number>();
  /** A roll-up that failed, retried as it was (same documents, same seq) before anything newer. */
  private readonly unfinished = new Map<string, { seq: number; rows: UsageRow[]; ids: string[] }>();
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
  private rolling: Promise<void> | null = null;
  private timer: NodeJS.Timeout | null = null;
  /** Inserts and roll-ups one at a time: a roll-up never sees half of a batch's documents. */
  private tail: Promise<unknown> = Promise.resolve();

  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.tail.then(fn, fn);
    this.tail = p.catch(() => undefined);
    return p;
  }

  constructor(private readonly ctx: MongoContext) {}

  private get rollupMs(): number {
    return this.ctx.opts.usageRollupMs ?? DEFAULT_USAGE_ROLLUP_MS;
  }

  async writeUsage(rows: UsageRow[], batch: { writer: string; seq: number }): Promise<void> {
    if (rows.length === 0) return;
    return this.exclusive(() => this.logBatch(rows, batch));
  }

  private async logBatch(rows: UsageRow[], batch: { writer: string; seq: number }): Promise<void> {
    const slot = await this.ctx.run(() => this.ctx.usageSlots.slotFor(batch.writer));
    this.writers.add(batch.writer);
    const seq = slot.rowSeq(batch.seq);
    const docs: UsageLogDoc[] = [];
    for (let i = 0, part = 0; i < rows.length; i += LOG_ROWS_PER_DOC, part++) {
      docs.push({ _id: `${slot.id}|${seq}|${part}`, slot: slot.id, seq, rows: rows.slice(i, i + LOG_ROWS_PER_DOC).map(toLogRow) });
    }
    if (this.sent.get(slot.id) !== seq) {
      this.sent.set(slot.id, seq);
      this.inDoubt.set(slot.id, seq);
      await this.insertLog(docs);
      this.inDoubt.delete(slot.id);
    } else {
      // Sent before (a retry): what landed of it is either still in the log, or
      // was applied by a roll-up (a batch in doubt stays in the log, so then the
      // whole batch had landed and its rows carry a seq at or above this one).
      const present = await this.ctx.run(() => this.ctx.usageLog.find({ slot: slot.id, seq }).toArray());
      if (present.length > 0) {
        const have = new Set(present.flatMap((d) => d.rows.map((l) => rowId(slot.id, fromLogRow(l)))));
        const missing = rows.filter((r) => !have.has(rowId(slot.id, r)));
        const attempt = present.length;
        const more: UsageLogDoc[] = [];
        for (let i = 0, part = 0; i < missing.length; i += LOG_ROWS_PER_DOC, part++) {
          more.push({ _id: `${slot.id}|${seq}|r${attempt}.${part}`, slot: slot.id, seq, rows: missing.slice(i, i + LOG_ROWS_PER_DOC).map(toLogRow) });
        }
        this.inDoubt.set(slot.id, seq);
        if (more.length > 0) await this.insertLog(more);
        this.inDoubt.delete(slot.id);
      } else {
        // Applied directly, under its seq — after everything older in the log
        // (and a roll-up left unfinished): a row raised to this seq first would
        // make the older documents look applied to it.
        await this.rollSlot(slot, batch.writer);
        await this.apply(slot, batch.writer, rows, seq, true);
      }
    }
    // Before the next batch: a new owner of the slot starts past this seq.
    await this.ctx.run(() => this.ctx.usageSlots.applied(slot, seq));
    this.startTimer();
  }

  private async insertLog(docs: UsageLogDoc[]): Promise<void> {
    await this.ctx.run(async () => {
      try {
        await this.ctx.usageLog.insertMany(docs, { ordered: false });
      } catch (err) {
        if (!isDuplicateKey(err) && !hasOnlyDuplicates(err)) throw err;
        // A retried batch: the parts that landed before are duplicates. FerretDB
        // ends even an unordered insert at its first error, so the rest one by one.
        for (const d of docs) {
          try {
            await this.ctx.usageLog.insertOne(d);
          } catch (e) {
            if (!isDuplicateKey(e)) throw e;
          }
        }
      }
    });
  }

  private startTimer(): void {
    if (this.timer || this.rollupMs <= 0) return;
    this.timer = setInterval(() => void this.rollUp().catch(() => undefined), this.rollupMs);
    this.timer.unref();
  }

  /**
   * Applies the log of every slot this process writes with to the rows (one
   * roll-up at a time; a call during one waits for it and runs another).
   */
  async rollUp(): Promise<void> {
    while (this.rolling) await this.rolling.catch(() => undefined);
    this.rolling = (async () => {
      for (const writer of this.writers) {
        await this.exclusive(async () => {
          const slot = await this.ctx.run(() => this.ctx.usageSlots.slotFor(writer));
          await this.rollSlot(slot, writer);
        });
      }
    })().finally(() => {
      this.rolling = null;
    });
    return this.rolling;
  }

  private async rollSlot(slot: Slot, writer: string): Promise<void> {
    const base = slot.rowSeq(0);
    // A roll-up of this slot that failed: the same documents under the same seq first.
    const left = this.unfinished.get(slot.id);
    if (left) {
      await this.apply(slot, writer, left.rows, left.seq, true);
      await this.deleteLog(left.ids);
      this.unfinished.delete(slot.id);
    }
    const docs = await this.ctx.run(() => this.ctx.usageLog.find({ slot: slot.id }).toArray());
    if (docs.length === 0) return;
    // A previous owner's documents (below this lease's first seq): one seq at a
    // time, in order, under the seq condition — a roll-up of theirs that stopped
    // half-way left its rows at its seq, at or above these.
    const old = docs.filter((d) => d.seq < base).sort((a, b) => a.seq - b.seq);
    for (let i = 0; i < old.length; ) {
      const seq = old[i].seq;
      const same: UsageLogDoc[] = [];
      while (i < old.length && old[i].seq === seq) same.push(old[i++]);
      await this.apply(slot, writer, same.flatMap((d) => d.rows.map(fromLogRow)), seq, true);
      await this.deleteLog(same.map((d) => d._id));
    }
    const doubt = this.inDoubt.get(slot.id) ?? Infinity;
    const own = docs.filter((d) => d.seq >= base && d.seq < doubt);
    if (own.length === 0) return;
    // This lease's documents: summed into one increment per row, under the
    // newest seq among them (every row of this slot is below it).
    const seq = Math.max(...own.map((d) => d.seq));
    const sum = new Map<string, UsageRow>();
    for (const d of own) {
      for (const l of d.rows) {
        const r = fromLogRow(l);
        const id = rowId(slot.id, r);
        const into = sum.get(id);
        if (!into) sum.set(id, r);
        else for (const c of COUNTERS) into.counts[c] += r.counts[c];
      }
    }
    const roll = { seq, rows: [...sum.values()], ids: own.map((d) => d._id) };
    this.unfinished.set(slot.id, roll);
    await this.apply(slot, writer, roll.rows, seq, this.attempted.get(slot.id) === seq);
    await this.deleteLog(roll.ids);
    this.unfinished.delete(slot.id);
  }

  private async deleteLog(ids: string[]): Promise<void> {
    for (let i = 0; i < ids.length; i += 500) {
      const chunk = ids.slice(i, i + 500);
      await this.ctx.run(() => this.ctx.usageLog.deleteMany({ _id: { $in: chunk } }));
    }
  }

  /**
   * Adds `rows` to the slot's row documents under `seq`: with `retry`, only to
   * rows below `seq` (a row already at it was reached by an earlier attempt).
   */
  private async apply(slot: Slot, writer: string, rows: UsageRow[], seq: number, retry: boolean): Promise<void> {
    this.attempted.set(slot.id, seq);
    const ops = rows.map((r) => {
      const inc: Record<string, number> = {};
      for (const c of COUNTERS) if (r.counts[c] !== 0) inc[c] = r.counts[c];
      const _id = rowId(slot.id, r);
      return {
        updateOne: {
          // Only `_id` is pushed down to SQLite by FerretDB; the seq condition is evaluated on every document.
          filter: retry ? { _id, $or: [{ seq: { $exists: false } }, { seq: { $lt: seq } }] } : { _id },
          update: { $inc: inc, $set: { seq }, $setOnInsert: { g: r.granularity, b: r.bucket, k: r.keyId, i: r.identityId, tag: r.tag } },
          upsert: true,
        },
      };
    });
    const chunkSize = this.ctx.opts.usageRollupChunk ?? 500;
    for (let i = 0; i < ops.length; i += chunkSize) {
      // Still this process's slot (a lease that lapsed and was taken over is the new owner's to roll up).
      const now = await this.ctx.run(() => this.ctx.usageSlots.slotFor(writer));
      if (now.id !== slot.id) throw new Error(`usage writer slot ${slot.id} was taken over; its new owner applies its log`);
      const chunk = ops.slice(i, i + chunkSize);
      await this.ctx.run(async () => {
        try {
          await this.ctx.usage.bulkWrite(chunk as never, { ordered: false });
        } catch (err) {
          if (!hasOnlyDuplicates(err)) throw err;
          // FerretDB ends even an unordered batch at its first error, without
          // applying or reporting the rest: apply the chunk again row by row,
          // under the seq condition (a row already at this seq is skipped).
          for (const op of chunk) {
            const filter = { _id: op.updateOne.filter._id, $or: [{ seq: { $exists: false } }, { seq: { $lt: seq } }] };
            try {
              await this.ctx.usage.updateOne(filter, op.updateOne.update, { upsert: true });
            } catch (e) {
              if (!isDuplicateKey(e)) throw e;
            }
          }
        }
      });
      await this.ctx.opts.usageRollupAfterChunk?.(Math.min(ops.length, i + chunkSize));
    }
  }

  async queryUsage(q: UsageQuery): Promise<UsageRow[]> {
    const by = q.by;
    const byIdentity = "identityId" in by;
    const want = "identityId" in by ? by.identityId : by.keyId;
    const filter: Record<string, unknown> = {
      ...(byIdentity ? { i: want } : { k: want }),
      g: q.granularity,
      b: { $gte: q.start, $lt: q.end },
      tag: q.tagged ? { $ne: "" } : "",
    };
    // The log first: a roll-up between the two reads is then seen in the rows (and skipped in the log).
    const log = await this.ctx.run(() => this.ctx.usageLog.find({}).toArray());
    const docs = await this.ctx.run(() => this.ctx.usage.find(filter).limit(q.maxRows + 1).toArray());
    const tooMany = () => new InvalidArgumentError("start_time", "the range holds too many rows for this breakdown; narrow it or use a coarser granularity");
    if (docs.length > q.maxRows) throw tooMany();
    const out = new Map<string, { row: UsageRow; seq: number }>();
    for (const d of docs) {
      const counts = {} as Counts;
      for (const c of COUNTERS) counts[c] = d[c] ?? 0;
      // `i ?? null`: FerretDB leaves a null out of $setOnInsert.
      out.set(String(d._id), { row: { granularity: d.g as Granularity, bucket: d.b, keyId: d.k, identityId: d.i ?? null, tag: d.tag, counts }, seq: d.seq ?? 0 });
    }
    for (const d of log) {
      for (const l of d.rows) {
        if (l.g !== q.granularity || l.b < q.start || l.b >= q.end || (byIdentity ? l.i : l.k) !== want || (q.tagged ? l.t === "" : l.t !== "")) continue;
        const r = fromLogRow(l);
        const id = rowId(d.slot, r);
        const have = out.get(id);
        if (!have) out.set(id, { row: r, seq: 0 });
        else if (have.seq < d.seq) for (const c of COUNTERS) have.row.counts[c] += r.counts[c];
      }
    }
    if (out.size > q.maxRows) throw tooMany();
    return [...out.values()].map((e) => e.row);
  }

  async pruneUsage(granularity: "minute" | "hour" | "day", before: number): Promise<void> {
    // This process's log first, so what is pruned is not read back from it.
    await this.rollUp();
    await this.ctx.run(() => this.ctx.usage.deleteMany({ g: granularity, b: { $lt: before } }));
  }

  /** Graceful stop: the timer ends and what the log holds is applied (what cannot be is left for the slot's next owner). */
  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    await this.rollUp().catch(() => undefined);
  }
}

/** A bulk write error whose every write error is a duplicate key. */
function hasOnlyDuplicates(err: unknown): boolean {
  const writeErrors = (err as { writeErrors?: unknown }).writeErrors;
  const list = (Array.isArray(writeErrors) ? writeErrors : writeErrors ? [writeErrors] : null) as { code?: number; errmsg?: string }[] | null;
  return !!list && list.length > 0 && list.every((e) => isDuplicateCode(e.code, e.errmsg));
}
