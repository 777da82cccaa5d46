import type { Logger } from "../server/logger.js";
import type { Store } from "../storage/store.js";
import type { VerificationCache } from "./verification-cache.js";

export interface InvalidationOptions {
  /** How often the change feed is read. Revocation reaches this instance within about this time. */
  pollMs: number;
  /** How long a gap in the change sequence is waited for before it is skipped. */
  gapWaitMs?: number;
  /** Changes older than this are deleted from the feed. */
  retentionMs?: number;
}

/**
 * Follows the store's change feed and evicts changed keys and identities from
 * the cache, so that a write on any instance is seen by every instance within
 * `pollMs` (plus one store round trip).
 *
 * Writers on MongoDB take a seq from one counter and then insert the change, so
 * seq N+1 can become visible just before seq N. The reader only advances its
 * cursor over contiguous seqs and waits up to `gapWaitMs` for a missing one.
 */
export function createInvalidationFeed(deps: { store: Store; cache: VerificationCache; logger: Logger; options: InvalidationOptions }) {
  const { store, cache, logger } = deps;
  const gapWaitMs = deps.options.gapWaitMs ?? 2000;
  const retentionMs = deps.options.retentionMs ?? 15 * 60_000;
  let cursor = 0;
  const seen = new Set<number>();
  let gapSince: number | null = null;
  let timer: NodeJS.Timeout | null = null;
  let running: Promise<void> | null = null;
  let stopped = false;
  let lastPrune = Date.now();
  let healthy = true;

  async function pollOnce(): Promise<void> {
    for (;;) {
      const changes = await store.changesSince(cursor, 1000);
      for (const c of changes) {
        if (seen.has(c.seq)) continue;
        seen.add(c.seq);
        if (c.kind === "key") cache.evictKey(c.hash);
        else cache.evictIdentity(c.id);
      }
      while (seen.has(cursor + 1)) {
        cursor++;
        seen.delete(cursor);
      }
      if (seen.size > 0) {
        // A gap below the newest change: wait for it, then skip it.
        const now = Date.now();
        gapSince ??= now;
        if (now - gapSince > gapWaitMs) {
          cursor = Math.min(...seen);
          seen.delete(cursor);
          while (seen.has(cursor + 1)) seen.delete(++cursor);
          gapSince = null;
        }
      } else {
        gapSince = null;
      }
      if (changes.length < 1000) break;
    }
    if (Date.now() - lastPrune > 60_000) {
      lastPrune = Date.now();
      await store.pruneChanges(Date.now() - retentionMs);
    }
  }

  /** Runs one poll, or joins the one in flight. */
  function poll(): Promise<void> {
    running ??= pollOnce()
      .then(
        () => {
          if (!healthy) logger.info("change feed readable again");
          healthy = true;
        },
        (err) => {
          if (healthy) logger.warn({ err: (err as Error).message }, "cannot read the change feed; cached entries expire by TTL");
          healthy = false;
        },
      )
      .finally(() => {
        running = null;
      });
    return running;
  }

  function schedule() {
    if (stopped) return;
    timer = setTimeout(() => void poll().then(schedule), deps.options.pollMs);
    timer.unref();
  }

  return {
    async start() {
      cursor = await store.lastChangeSeq();
      schedule();
    },
    /**
     * Reads the feed now. Called after a local write so this instance reads its
     * own writes at once; joins a poll in flight and then runs a fresh one.
     */
    async sync() {
      if (running) await running;
      await poll();
    },
    stop() {
      stopped = true;
      if (timer) clearTimeout(timer);
    },
  };
}

export type InvalidationFeed = ReturnType<typeof createInvalidationFeed>;
