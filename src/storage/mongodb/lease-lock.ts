import { randomBytes } from "node:crypto";
import { MongoServerError, type Collection } from "mongodb";
import { UnavailableError } from "../../domain/errors.js";

/*
 * A per-document lock across processes, for servers whose only atomic
 * primitive is inserting a document with a unique `_id` (FerretDB 1.x applies
 * every update as a read and a whole-document write). See docs/credits.md
 * ("The MongoDB lease lock") for the design and what each path relies on.
 *
 * - In this process: one FIFO queue per lock name, bounded (`queueMax`); a call
 *   that finds it full is refused at once with UNAVAILABLE, and a waiter leaves
 *   when its signal aborts (deadline, cancellation). Only the head of the queue
 *   talks to the store, and gives up after `waitMs` (UNAVAILABLE).
 * - Across processes: the lock is a document `{_id: name, token, beat}` taken by
 *   a unique insert and released by deleting it. Its holder bumps `beat` every
 *   `leaseMs / 4` while it holds it. A waiter that sees the same (token, beat)
 *   for `leaseMs` by its OWN clock takes the lock over — no clocks are compared
 *   between machines. Only one waiter may take over a given holder: it must
 *   first insert the marker `{_id: name + "#" + token}` (a unique insert).
 * - Fencing: a holder may still be running after it was taken over (a stalled
 *   event loop, a partitioned network). Every write made under the lock is a
 *   fenced write: its filter names the document's write counter `_fence` as the
 *   holder read it, and the write increments it. A holder that lost its lock
 *   finds the counter moved and writes nothing (UNAVAILABLE).
 */

/** The document field that counts writes made under a lock (or by conditional credit writes). */
export const FENCE = "_fence";

/** Filter part of a fenced write: the write counter as it was read. */
export function fenceFilter(doc: { [FENCE]?: number }): Record<string, unknown> {
  return doc[FENCE] === undefined ? { [FENCE]: { $exists: false } } : { [FENCE]: doc[FENCE] };
}

export type LockDoc = { _id: string; token: string; beat: number };

export interface LockOptions {
  /** A holder that shows no sign of life (its `beat`) for this long is taken over. Default 1500 ms. */
  leaseMs?: number;
  /** How long a caller waits for another process's lock before UNAVAILABLE. Default 5000 ms. */
  waitMs?: number;
  /**
   * Callers that may wait in this process for one lock name; more are refused
   * at once with UNAVAILABLE. Default 64 (spends of one balance wait apart from
   * this, batched: see MongoCredits.spendLocked, credits.ts).
   */
  queueMax?: number;
}

interface Local {
  held: boolean;
  waiters: { grant: () => void; fail: (err: unknown) => void }[];
}

function isDuplicate(err: unknown): boolean {
  return err instanceof MongoServerError && (err.code === 11000 || (err.code === 1 && /UNIQUE constraint failed/.test(err.message)));
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export function createLockManager(locks: Collection<LockDoc>, opts: LockOptions = {}) {
  const leaseMs = opts.leaseMs ?? 1500;
  const waitMs = opts.waitMs ?? 5000;
  const queueMax = opts.queueMax ?? 64;
  const local = new Map<string, Local>();

  /** Waits for this process's turn on `name` (FIFO, bounded in length; a waiter leaves when its signal aborts). */
  function enter(name: string, signal?: AbortSignal): Promise<void> {
    let l = local.get(name);
    if (!l) local.set(name, (l = { held: false, waiters: [] }));
    if (!l.held) {
      l.held = true;
      return Promise.resolve();
    }
    if (l.waiters.length >= queueMax) {
      return Promise.reject(new UnavailableError(`busy: ${l.waiters.length} calls already wait for ${name}; retry`));
    }
    const lock = l;
    return new Promise<void>((resolve, reject) => {
      const waiter = {
        grant: () => {
          signal?.removeEventListener("abort", onAbort);
          resolve();
        },
        fail: (err: unknown) => {
          signal?.removeEventListener("abort", onAbort);
          const i = lock.waiters.indexOf(waiter);
          if (i >= 0) lock.waiters.splice(i, 1);
          reject(err);
        },
      };
      const onAbort = () => waiter.fail(signal!.reason);
      signal?.addEventListener("abort", onAbort, { once: true });
      lock.waiters.push(waiter);
    });
  }

  function leave(name: string): void {
    const l = local.get(name)!;
    const next = l.waiters.shift();
    if (next) next.grant();
    else local.delete(name);
  }

  /** Takes the shared lock document for `token`, taking over a holder that stopped showing signs of life. */
  async function take(name: string, token: string, deadline: number, signal?: AbortSignal): Promise<void> {
    /** What this waiter saw of the holder, and since when (its own clock). */
    let seen: { token: string; beat: number; since: number } | null = null;
    /** The same for another waiter's takeover marker. */
    let marker: { token: string; since: number } | null = null;
    for (let attempt = 0; ; attempt++) {
      try {
        await locks.insertOne({ _id: name, token, beat: 0 });
        return;
      } catch (err) {
        if (!isDuplicate(err)) throw err;
      }
      const holder = await locks.findOne({ _id: name });
      if (!holder) continue; // released between our insert and our read
      const now = Date.now();
      if (!seen || seen.token !== holder.token || seen.beat !== holder.beat) {
        seen = { token: holder.token, beat: holder.beat, since: now };
      } else if (now - seen.since >= leaseMs) {
        // Silent for a lease: take it over. Only the waiter that inserts the
        // marker for this holder removes its lock; a marker whose waiter died is
        // itself removed after a lease.
        const markerId = `${name}#${holder.token}`;
        try {
          await locks.insertOne({ _id: markerId, token, beat: 0 });
          await locks.deleteOne({ _id: name, token: holder.token });
          await locks.deleteOne({ _id: markerId, token });
          seen = null;
          continue;
        } catch (err) {
          if (!isDuplicate(err)) throw err;
          const m = await locks.findOne({ _id: markerId });
          if (m && (!marker || marker.token !== m.token)) marker = { token: m.token, since: now };
          else if (m && now - marker!.since >= leaseMs) await locks.deleteOne({ _id: markerId, token: m.token });
        }
      }
      signal?.throwIfAborted();
      if (now >= deadline) throw new UnavailableError(`busy: ${name} stayed locked`);
      await sleep(Math.min(20, 1 + attempt) * (0.5 + Math.random() / 2));
    }
  }

  return {
    leaseMs,
    /**
     * Runs `fn` holding lock `name`: first in this process, then across
     * processes. `fn`'s writes must be fenced (fenceFilter) to be safe against a
     * holder that lost the lock while it ran.
     */
    async locked<T>(name: string, fn: () => Promise<T>, signal?: AbortSignal): Promise<T> {
      signal?.throwIfAborted();
      await enter(name, signal);
      try {
        const token = randomBytes(8).toString("hex");
        await take(name, token, Date.now() + waitMs, signal);
        const renew = setInterval(() => void locks.updateOne({ _id: name, token }, { $inc: { beat: 1 } }).catch(() => undefined), Math.max(50, leaseMs / 4));
        renew.unref();
        try {
          return await fn();
        } finally {
          clearInterval(renew);
          await locks.deleteOne({ _id: name, token }).catch(() => undefined);
        }
      } finally {
        leave(name);
      }
    },
    /** Callers waiting in this process for `name` (not counting the one holding it). */
    waiting(name: string): number {
      return local.get(name)?.waiters.length ?? 0;
    },
  };
}

export type LockManager = ReturnType<typeof createLockManager>;
