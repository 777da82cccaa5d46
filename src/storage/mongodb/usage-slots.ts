import { randomBytes } from "node:crypto";
import type { Collection } from "mongodb";

/**
 * Usage rows on MongoDB are written per writer (FerretDB applies `$inc` as a
 * read plus a write, so two writers must never update one document), and a
 * writer's batches carry an increasing seq so a retried batch is applied once
 * (see MongoUsage.writeUsage, usage.ts). If every process were a writer of its own, rows
 * would multiply with every restart. Instead a process leases one of a small
 * set of writer slots (`w0`, `w1`, …) and writes the slot's rows: a restart
 * takes a free slot again, so rows grow with the number of instances running
 * at once, not with their history. See docs/usage-storage.md.
 *
 * A slot document holds its lease (`owner`, `until`) and the last row seq the
 * slot applied (`seq`), recorded after every batch and before the next one, so
 * at most one batch beyond `seq` can have reached rows. A new owner starts two
 * past it; its batches are never taken for the dead owner's retries.
 *
 * Taking a slot relies on one atomic primitive, a unique `_id` insert (atomic
 * on MongoDB and FerretDB alike): a free slot is claimed by inserting it, an
 * expired lease is taken over by whoever inserts the takeover ticket of that
 * lease (then replaces the slot document in place), so of several racing instances one wins. Leases are renewed every `leaseMs / 4`; a process
 * that could not renew for half the lease renews before writing, and if the
 * slot was taken meanwhile claims another (clock skew between instances up to
 * `leaseMs / 2` is tolerated). The one case that can count twice: a batch that
 * failed half-way, retried after another instance took the slot over (it could
 * reach the store for more than half a lease while this one could not).
 */
export type SlotDoc = { _id: string; owner: string; until: number; seq: number };

export interface Slot {
  /** The slot's id, used as the writer of the rows. */
  readonly id: string;
  /** Row seq for batch `seq` of the process's recorder. */
  rowSeq(seq: number): number;
}

interface Held {
  id: string;
  base: number;
  /** Until when this process may write with the slot (local clock, with the safety margin). */
  safeUntil: number;
}

export interface UsageSlotOptions {
  leaseMs?: number;
  maxSlots?: number;
  now?: () => number;
}

export function createUsageSlots(coll: () => Collection<SlotDoc>, opts: UsageSlotOptions = {}) {
  const leaseMs = opts.leaseMs ?? 60_000;
  const maxSlots = opts.maxSlots ?? 10_000;
  const now = opts.now ?? Date.now;
  const owner = randomBytes(9).toString("base64url");
  /** By recorder writer id (one per recorder; tests may run several in one process). */
  const held = new Map<string, Held>();
  let renewTimer: NodeJS.Timeout | null = null;

  function isDuplicate(err: unknown): boolean {
    const e = err as { code?: number; message?: string };
    return e?.code === 11000 || (e?.code === 1 && /UNIQUE constraint failed/.test(e.message ?? ""));
  }

  async function claim(): Promise<Held> {
    const taken = new Set([...held.values()].map((h) => h.id));
    for (let n = 0; n < maxSlots; n++) {
      const id = `w${n}`;
      if (taken.has(id)) continue;
      const t = now();
      try {
        await coll().insertOne({ _id: id, owner, until: t + leaseMs, seq: 0 });
        return { id, base: 0, safeUntil: t + leaseMs / 2 };
      } catch (err) {
        if (!isDuplicate(err)) throw err;
      }
      const doc = await coll().findOne({ _id: id });
      if (!doc || doc.until >= t) continue;
      // Expired. Of the instances that may race for it, the one that inserts the
      // ticket for this very lease takes it over; the others move on. (A filtered
      // delete is no arbiter on FerretDB, which reads, filters and then deletes by
      // _id: a racer could delete the winner's new lease.)
      try {
        await coll().insertOne({ _id: `${id}:takeover:${doc.owner}:${doc.until}`, owner, until: t, seq: doc.seq });
      } catch (err) {
        if (!isDuplicate(err)) throw err;
        continue;
      }
      const base = doc.seq + 2;
      // Replaced in place (never deleted, so a fresh claim cannot slip in with seq 0).
      await coll().replaceOne({ _id: id }, { owner, until: t + leaseMs, seq: base });
      return { id, base, safeUntil: t + leaseMs / 2 };
    }
    throw new Error(`no free usage writer slot among ${maxSlots}`);
  }

  async function renew(): Promise<void> {
    for (const [writer, h] of held) {
      const t = now();
      try {
        const res = await coll().updateOne({ _id: h.id, owner }, { $set: { until: t + leaseMs } });
        if (res.matchedCount === 0) held.delete(writer);
        else h.safeUntil = t + leaseMs / 2;
      } catch {
        // Unreachable store: the lease runs out locally (safeUntil) and is claimed again before the next write.
      }
    }
  }

  function ensureTimer() {
    if (renewTimer) return;
    renewTimer = setInterval(() => void renew(), leaseMs / 4);
    renewTimer.unref();
  }

  return {
    /** The slot recorder `writer` writes with, claiming (again) when it has none or its lease may have run out. */
    async slotFor(writer: string): Promise<Slot> {
      let h = held.get(writer);
      if (h && now() >= h.safeUntil) {
        // Not renewed for half the lease (e.g. the store was unreachable). Keep the
        // slot if nobody took it meanwhile: a batch that failed half-way is then
        // retried on the same rows, under the same seq, and counted once.
        const t = now();
        const res = await coll().updateOne({ _id: h.id, owner }, { $set: { until: t + leaseMs } });
        if (res.matchedCount === 1) h.safeUntil = t + leaseMs / 2;
        else {
          held.delete(writer);
          h = undefined;
        }
      }
      if (!h) {
        h = await claim();
        held.set(writer, h);
        ensureTimer();
      }
      const { id, base } = h;
      return { id, rowSeq: (seq) => base + seq };
    },
    /** Records that the slot applied rows up to `rowSeq` (before the next batch may start). */
    async applied(slot: Slot, rowSeq: number): Promise<void> {
      const t = now();
      const res = await coll().updateOne({ _id: slot.id, owner }, { $set: { seq: rowSeq, until: t + leaseMs } });
      for (const [writer, h] of held) {
        if (h.id !== slot.id) continue;
        if (res.matchedCount === 0) held.delete(writer);
        else h.safeUntil = t + leaseMs / 2;
      }
    },
    /** Gives the slots back (graceful stop): the next process takes them at once. */
    async release(): Promise<void> {
      if (renewTimer) clearInterval(renewTimer);
      renewTimer = null;
      const ids = [...held.values()].map((h) => h.id);
      held.clear();
      await Promise.all(ids.map((id) => coll().updateOne({ _id: id, owner }, { $set: { until: 0 } }).catch(() => undefined)));
    },
  };
}

export type UsageSlots = ReturnType<typeof createUsageSlots>;
