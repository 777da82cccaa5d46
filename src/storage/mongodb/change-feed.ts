import { performance } from "node:perf_hooks";
import { MongoServerError } from "mongodb";
import type { Change } from "../store.js";
import { fromFeedDoc, seqId, type FeedDoc } from "./documents.js";
import type { MongoContext } from "./context.js";

/**
 * The change feed's reads and pruning (docs/revocation.md); its writes, the
 * intent/done bracket of every key and identity write, are the context's
 * (`changing`, context.ts), which every part writes through.
 */
export class MongoChangeFeed {
  constructor(private readonly ctx: MongoContext) {}

  /** Entries of one bucket with a seq above `afterSeq`, at most `limit`, in seq order. */
  private async bucketRange(afterSeq: number, limit: number): Promise<FeedDoc[]> {
    const coll = this.ctx.feedOf(afterSeq + 1);
    const filter = { _id: { $gt: seqId(afterSeq) } };
    if (this.ctx.flavor === "mongodb") return coll.find(filter).sort({ _id: 1 }).limit(limit).toArray();
    // FerretDB sorts in Go after reading every entry; without a sort it stops at
    // `limit`, reading in insertion order, which is seq order (written without gaps).
    const docs = await coll.find(filter).limit(limit).toArray();
    return docs.sort((a, b) => a.seq - b.seq);
  }

  /** Entries above `afterSeq` in seq order, at most `limit`, across buckets while each read ends at its bucket's last seq. */
  private async feedRange(afterSeq: number, limit: number): Promise<FeedDoc[]> {
    const out: FeedDoc[] = [];
    for (let after = afterSeq; out.length < limit; ) {
      const docs = await this.bucketRange(after, limit - out.length);
      out.push(...docs);
      const bucketLast = (Math.floor((after + 1) / this.ctx.feedBucket) + 1) * this.ctx.feedBucket - 1;
      if (docs.length === 0 || docs[docs.length - 1].seq !== bucketLast) break;
      after = bucketLast;
    }
    return out;
  }

  /**
   * A point lookup of `afterSeq + 1` first: on an idle feed that is all a
   * poll costs (on FerretDB a scan of one bucket at most, whatever the
   * history). Only when it exists are the next ones read, in one range.
   */
  async changesSince(afterSeq: number, limit: number, opts: { pastGaps?: boolean } = {}): Promise<Change[]> {
    return this.ctx.run(async () => {
      if (opts.pastGaps) {
        // From the first bucket that holds anything above `afterSeq`.
        for (const b of await this.ctx.feedBuckets()) {
          if ((b + 1) * this.ctx.feedBucket - 1 <= afterSeq) continue;
          const docs = await this.feedRange(Math.max(afterSeq, b * this.ctx.feedBucket - 1), limit);
          if (docs.length > 0) return docs.map(fromFeedDoc);
        }
        return [];
      }
      const first = await this.ctx.feedOf(afterSeq + 1).findOne({ _id: seqId(afterSeq + 1) });
      if (!first) return [];
      if (limit <= 1) return [fromFeedDoc(first)];
      const sentAt = performance.now();
      const rest = await this.feedRange(afterSeq + 1, limit - 1);
      const all = [first, ...rest];
      // The end of the feed was reached: its last seq was the newest when the range was read.
      const last = all[all.length - 1].seq;
      if (rest.length < limit - 1 && last === afterSeq + all.length && (!this.ctx.feedHead || this.ctx.feedHead.seq <= last)) {
        this.ctx.feedHead = { seq: last, at: sentAt };
      }
      return all.map(fromFeedDoc);
    });
  }

  async changeFeedStart(): Promise<number> {
    return this.ctx.run(async () => {
      for (const b of await this.ctx.feedBuckets()) {
        // The oldest entry: by the `_id` index on MongoDB; on FerretDB the first in insertion order (seq order).
        const oldest = this.ctx.feedOf(b * this.ctx.feedBucket).find({}, { projection: { seq: 1 } });
        const d = await (this.ctx.flavor === "mongodb" ? oldest.sort({ _id: 1 }) : oldest).limit(1).next();
        if (d) return d.seq - 1;
      }
      return 0;
    });
  }

  async lastChangeSeq(): Promise<number> {
    return this.ctx.run(() => this.ctx.newestSeq());
  }

  /**
   * Drops the buckets whose every seq is below `beforeSeq` (which exists or
   * existed, so the newest entry is never deleted), then deletes the entries
   * below it in its own bucket (one bucket: FerretDB reads at most that many).
   */
  async pruneChanges(beforeSeq: number): Promise<void> {
    await this.ctx.run(async () => {
      for (const b of await this.ctx.feedBuckets()) {
        if ((b + 1) * this.ctx.feedBucket > beforeSeq) break;
        await this.ctx.feedOf(b * this.ctx.feedBucket)
          .drop()
          .catch((err: unknown) => {
            // Another instance dropped it first.
            if (!(err instanceof MongoServerError && (err.code === 26 || /not found/i.test(err.message)))) throw err;
          });
      }
      if (beforeSeq % this.ctx.feedBucket !== 0) await this.ctx.feedOf(beforeSeq).deleteMany({ _id: { $lt: seqId(beforeSeq) } });
    });
  }
}
