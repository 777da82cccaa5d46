import { InvalidArgumentError } from "../../domain/errors.js";
import { COUNTERS, type Counts, type UsageQuery, type UsageRow } from "../../domain/usage.js";
import { isDuplicateCode, isDuplicateKey } from "./errors.js";
import type { MongoContext } from "./context.js";

/** Usage rows, written per leased writer slot (usage-slots.ts) so no two writers update one row. */
export class MongoUsage {
  /** Per slot, the row seq of the last batch this process sent (see writeUsage). */
  private readonly attempted = new Map<string, number>();

  constructor(private readonly ctx: MongoContext) {}

  async writeUsage(rows: UsageRow[], batch: { writer: string; seq: number }): Promise<void> {
    if (rows.length === 0) return;
    // Rows are per writer slot (leased by one server process at a time, which
    // writes one batch at a time), so no two writers ever update one document. A
    // row already carrying this batch's seq does not match the filter; its upsert
    // then hits the unique _id and is skipped: a retried batch is applied once.
    //
    // Only a batch sent before can have reached rows under its seq (the slot is
    // this process's, and a new owner starts past every seq the old one used),
    // so its first sending filters by `_id` alone: the one filter FerretDB
    // pushes down to SQLite. The seq condition, which FerretDB evaluates on
    // every document of the collection, is kept for a retry of a batch that
    // failed half-way (its usage flush was ~3/4 of FerretDB's CPU per
    // verification, docs/performance.md step 8c).
    const slot = await this.ctx.run(() => this.ctx.usageSlots.slotFor(batch.writer));
    const seq = slot.rowSeq(batch.seq);
    const retry = this.attempted.get(slot.id) === seq;
    this.attempted.set(slot.id, seq);
    const ops = rows.map((r) => {
      const inc: Record<string, number> = {};
      for (const c of COUNTERS) if (r.counts[c] !== 0) inc[c] = r.counts[c];
      const _id = `${slot.id}|${r.granularity}|${r.bucket}|${r.keyId}|${r.identityId ?? ""}|${r.tag}`;
      return {
        updateOne: {
          filter: retry ? { _id, $or: [{ seq: { $exists: false } }, { seq: { $lt: seq } }] } : { _id },
          update: { $inc: inc, $set: { seq }, $setOnInsert: { g: r.granularity, b: r.bucket, k: r.keyId, i: r.identityId, tag: r.tag } },
          upsert: true,
        },
      };
    });
    await this.ctx.run(async () => {
      for (let i = 0; i < ops.length; i += 500) {
        const chunk = ops.slice(i, i + 500);
        try {
          await this.ctx.usage.bulkWrite(chunk as never, { ordered: false });
        } catch (err) {
          const writeErrors = (err as { writeErrors?: unknown }).writeErrors;
          const list = (Array.isArray(writeErrors) ? writeErrors : writeErrors ? [writeErrors] : null) as
            | { code?: number; errmsg?: string }[]
            | null;
          if (!list || list.some((e) => !isDuplicateCode(e.code, e.errmsg))) throw err;
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
      }
    });
    // Before the next batch: a new owner of the slot starts past this seq.
    await this.ctx.run(() => this.ctx.usageSlots.applied(slot, seq));
  }

  async queryUsage(q: UsageQuery): Promise<UsageRow[]> {
    const filter: Record<string, unknown> = {
      ...("identityId" in q.by ? { i: q.by.identityId } : { k: q.by.keyId }),
      g: q.granularity,
      b: { $gte: q.start, $lt: q.end },
      tag: q.tagged ? { $ne: "" } : "",
    };
    const docs = await this.ctx.run(() => this.ctx.usage.find(filter).limit(q.maxRows + 1).toArray());
    if (docs.length > q.maxRows) throw new InvalidArgumentError("start_time", "the range holds too many rows for this breakdown; narrow it or use a coarser granularity");
    return docs.map((d) => {
      const counts = {} as Counts;
      for (const c of COUNTERS) counts[c] = d[c] ?? 0;
      // `i ?? null`: FerretDB leaves a null out of $setOnInsert.
      return { granularity: d.g as UsageRow["granularity"], bucket: d.b, keyId: d.k, identityId: d.i ?? null, tag: d.tag, counts };
    });
  }

  async pruneUsage(granularity: "minute" | "hour" | "day", before: number): Promise<void> {
    await this.ctx.run(() => this.ctx.usage.deleteMany({ g: granularity, b: { $lt: before } }));
  }
}
