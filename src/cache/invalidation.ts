import { performance } from "node:perf_hooks";
import type { Logger } from "../observability/logger.js";
import type { Metrics } from "../observability/metrics.js";
import type { Change, ChangeFeed, ChangeTargets } from "../domain/ports/change-feed.js";
import type { VerificationCache } from "./verification-cache.js";

/**
 * What an instance does while it has not read the change feed to its end for
 * longer than the revocation bound: `read-through` verifies against the store
 * (cached entries are not used); `not-serving` keeps answering from the cache
 * and reports NOT_SERVING through health, for a load balancer to act on.
 */
export type FeedStalePolicy = "read-through" | "not-serving";

export interface InvalidationOptions {
  /** How often the change feed is read. Revocation reaches this instance within about this time. */
  pollMs: number;
  /** See FeedStalePolicy. Default: read-through. */
  stalePolicy?: FeedStalePolicy;
  /** The revocation bound: the feed counts as behind once it has not been read to its end for this long. Default 1000 ms. */
  boundMs?: number;
  /**
   * Changes this reader saw at least this long ago are pruned from the feed.
   * Default 5 s: at least the time a write may land after its intent
   * (src/storage/mongodb/context.ts), and twice the time a writer may number
   * a change from a seq it knew to be the newest.
   */
  retentionMs?: number;
  /** Changes read per store call. Default 500. */
  pageSize?: number;
}

/** Pages read in one poll at most, so a long backlog does not hold a poll forever. */
const MAX_PAGES = 20;
/** How often this reader prunes the feed. */
const PRUNE_EVERY_MS = 1000;
/** Most changes read in one store call when the reader is behind (pages grow from `pageSize` while they come back full). */
const MAX_PAGE = 50_000;
/** A backlog longer than this is not read: the cache is emptied and reading goes on from the newest change. */
const JUMP_BACKLOG = 5000;
/**
 * The longest bound a store gives an intent (src/storage/mongodb/context.ts):
 * after changes may have been missed, nothing read from the store is cached for
 * this long, since a write announced by a missed intent may still land.
 */
const MAX_INTENT_BOUND_MS = 5000;
/** How often a reader that finds nothing new checks that nothing newer exists past a missing entry. */
const DEEP_CHECK_MS = 5000;

/**
 * Follows the store's change feed and evicts changed keys and identities from
 * the cache, so that a write on any instance is seen by every instance within
 * `pollMs` (plus one store round trip). The design, and the store guarantees
 * each step relies on, are in docs/revocation.md. In short:
 *
 * - Seqs have no gaps (a store writes seq N only once N-1 exists), so finding
 *   `cursor + 1` missing means the reader has seen every change written before
 *   it looked: that moment is recorded as the last complete read.
 * - Entries can still go missing (pruned while this reader was behind, lost in
 *   a failover, deleted by hand): every DEEP_CHECK_MS, and whenever the reader
 *   was behind, a reader that finds nothing new asks for the newest seq, and
 *   when that is past the cursor reads on past the missing entry. A jump in the
 *   seqs empties the whole cache (a resync): never skipped silently.
 * - A backlog of more than JUMP_BACKLOG changes is not read (on FerretDB that
 *   costs the store ~0.1 ms a change): the cache is emptied and reading goes on
 *   from the newest one.
 * - After a resync nothing is cached for MAX_INTENT_BOUND_MS, in case a write
 *   announced by a missed intent has yet to land.
 * - An `intent` pins its entries (read from the store, never cached) until its
 *   `done` arrives or its bound has passed on this reader's clock.
 * - While the last complete read is older than `boundMs`, cached answers are
 *   not used (read-through) or health says NOT_SERVING (not-serving).
 * - A read unanswered for longer than `pollMs` is reported (onStalled): the
 *   store guard then pings the store, so that a store that stopped answering
 *   (a hung server, a lost network: no error, just silence) is found out about
 *   as soon as the feed is behind, not at the next health check.
 */
export function createInvalidationFeed(deps: {
  store: ChangeFeed;
  cache: VerificationCache;
  logger: Logger;
  metrics?: Metrics;
  options: InvalidationOptions;
  /** Monotonic milliseconds (tests inject one). */
  clock?: () => number;
  /** Called when the feed turns fresh or behind. */
  onFreshness?: (fresh: boolean) => void;
  /**
   * Called once per read of the feed still unanswered a poll interval after it
   * was sent: a sign that the store may have stopped answering (the store
   * guard probes it), well before the feed falls behind the revocation bound.
   */
  onStalled?: () => void;
}) {
  const { store, cache, logger, metrics } = deps;
  const clock = deps.clock ?? (() => performance.now());
  const boundMs = deps.options.boundMs ?? 1000;
  const retentionMs = deps.options.retentionMs ?? 5000;
  const pageSize = deps.options.pageSize ?? 500;
  const policy = deps.options.stalePolicy ?? "read-through";
  // Past this, changes above the cursor may have been pruned unseen (retention / 2 leaves room for clock rates).
  const resyncAfterMs = retentionMs / 2;

  let cursor = 0;
  /** Clock time at which the last read that reached the end of the feed was issued. */
  let lastComplete = -Infinity;
  let lastDeepCheck = -Infinity;
  const startedAt = clock();
  const intents = new Map<number, { targets: ChangeTargets; until: number }>();
  /** (time, cursor) after complete reads: what the feed held then, for pruning what is older than the retention. */
  const samples: { at: number; seq: number }[] = [];
  let nextPrune = clock() + PRUNE_EVERY_MS;
  let prunedBelow = 0;
  let timer: NodeJS.Timeout | null = null;
  let watchdog: NodeJS.Timeout | null = null;
  let running: Promise<void> | null = null;
  /** When (on `clock`) the poll in flight started, and whether it has been reported stalled. */
  let runningSince = 0;
  let stallReported = false;
  let stopped = false;
  let readable = true;
  let wasFresh: boolean | null = null;
  let quarantineUntil = -Infinity;

  const fresh = () => clock() - lastComplete <= boundMs;
  const lagMs = () => clock() - (Number.isFinite(lastComplete) ? lastComplete : startedAt);
  const settled = () => clock() >= quarantineUntil;
  cache.setPolicy({
    useCached: policy === "read-through" ? () => fresh() && settled() : settled,
    keepFills: settled,
    clock,
    lastComplete: () => lastComplete,
  });

  function each(t: ChangeTargets, key: (hash: string) => void, identity: (id: string) => void): void {
    for (const k of t.keys) key(k.hash);
    for (const i of t.identities) identity(i);
  }

  function apply(c: Change): void {
    if (c.phase === "intent") {
      if (intents.has(c.seq)) return;
      intents.set(c.seq, { targets: c, until: clock() + c.boundMs });
      each(c, cache.pinKey, cache.pinIdentity);
      return;
    }
    each(c, cache.evictKey, cache.evictIdentity);
    if (c.phase === "done") {
      const open = intents.get(c.intent);
      if (open) {
        intents.delete(c.intent);
        each(open.targets, cache.unpinKey, cache.unpinIdentity);
      }
    }
  }

  /** Releases the entries of intents whose write has landed by now, done or not. */
  function expireIntents(): void {
    const t = clock();
    for (const [seq, open] of intents) {
      if (open.until > t) continue;
      intents.delete(seq);
      each(open.targets, cache.unpinKey, cache.unpinIdentity);
    }
  }

  /** Changes `from`..`to` are missing (or skipped): forget everything cached, and cache nothing until missed intents have run out. */
  function resync(from: number, to: number, why: string): void {
    logger.warn({ from, to }, `change feed: ${why}; emptying the verification cache`);
    metrics?.feedResyncs.inc();
    cache.clear();
    quarantineUntil = clock() + MAX_INTENT_BOUND_MS;
  }

  function checkFreshness(): void {
    const f = fresh();
    if (f === wasFresh) return;
    wasFresh = f;
    if (!f) logger.warn({ lagMs: Math.round(lagMs()), policy }, "change feed behind the revocation bound");
    else logger.info("change feed caught up");
    deps.onFreshness?.(f);
  }

  async function pollOnce(): Promise<void> {
    let size = pageSize;
    for (let pages = 1; ; pages++) {
      const probeAt = clock();
      let page = await store.changesSince(cursor, size);
      // Nothing new, unless the next entry is missing and later ones exist. Checked
      // every DEEP_CHECK_MS, and always when this reader was behind (the feed may
      // have been pruned past it).
      if (page.length === 0 && (probeAt - lastComplete > resyncAfterMs || probeAt - lastDeepCheck >= DEEP_CHECK_MS)) {
        lastDeepCheck = probeAt;
        if ((await store.lastChangeSeq()) > cursor) page = await store.changesSince(cursor, size, { pastGaps: true });
      }
      for (const c of page) {
        if (c.seq <= cursor) continue;
        if (c.seq !== cursor + 1) resync(cursor + 1, c.seq - 1, "changes are missing");
        apply(c);
        cursor = c.seq;
      }
      if (page.length >= size) {
        if (pages >= MAX_PAGES) break;
        if (size === pageSize) {
          const newest = await store.lastChangeSeq();
          if (newest - cursor > JUMP_BACKLOG) {
            resync(cursor + 1, newest, `${newest - cursor} changes behind`);
            cursor = newest;
            continue;
          }
        }
        // Behind: larger pages (a store without a usable index reads what precedes the cursor for every page).
        size = Math.min(size * 8, MAX_PAGE);
        continue;
      }
      lastComplete = probeAt;
      if (samples.length === 0 || probeAt - samples[samples.length - 1].at >= PRUNE_EVERY_MS / 2) samples.push({ at: probeAt, seq: cursor });
      break;
    }
    expireIntents();
    await maybePrune();
  }

  /** Deletes what this reader saw at least `retentionMs` ago: every reader that reads the feed at all has seen it. */
  async function maybePrune(): Promise<void> {
    const t = clock();
    if (t < nextPrune) return;
    // Spread over time, so that instances seldom prune the same entries at once.
    nextPrune = t + PRUNE_EVERY_MS * (0.5 + Math.random());
    let old: { at: number; seq: number } | undefined;
    while (samples.length > 0 && samples[0].at <= t - retentionMs) old = samples.shift();
    if (!old || old.seq <= prunedBelow) return;
    try {
      await store.pruneChanges(old.seq);
      prunedBelow = old.seq;
    } catch (err) {
      logger.warn({ err: (err as Error).message }, "change feed: pruning failed; retried later");
    }
  }

  /** A poll unanswered for longer than the poll interval: reported once (onStalled). */
  function checkStalled(): void {
    if (!running || stallReported || clock() - runningSince <= deps.options.pollMs) return;
    stallReported = true;
    deps.onStalled?.();
  }

  /** Runs one poll, or joins the one in flight. */
  function poll(): Promise<void> {
    if (!running) {
      runningSince = clock();
      stallReported = false;
    }
    running ??= pollOnce()
      .then(
        () => {
          if (!readable) logger.info("change feed readable again");
          readable = true;
        },
        (err) => {
          metrics?.feedReadErrors.inc();
          if (readable) logger.warn({ err: (err as Error).message, policy }, "cannot read the change feed");
          readable = false;
        },
      )
      .finally(() => {
        running = null;
        checkFreshness();
      });
    return running;
  }

  /**
   * Polls every `pollMs` from start to start, so a slow poll does not push the
   * next one back by its own length; but never sooner than `pollMs / 2` after
   * one ended, so a slow store is not read back to back.
   */
  function schedule(lastStart = clock()) {
    if (stopped) return;
    timer = setTimeout(
      () => {
        const start = clock();
        void poll().then(() => schedule(start));
      },
      Math.max(deps.options.pollMs / 2, deps.options.pollMs - (clock() - lastStart)),
    );
    timer.unref();
  }

  return {
    async start() {
      cursor = await store.changeFeedStart();
      if (metrics) metrics.feed.probe = { lagMs, fresh };
      // Reads every retained change first, so intents still open are pinned.
      await poll();
      schedule();
      watchdog = setInterval(() => {
        expireIntents();
        checkFreshness();
        checkStalled();
      }, Math.min(100, boundMs / 4));
      watchdog.unref();
    },
    /**
     * Reads the feed now. Called after a local write so this instance reads its
     * own writes at once; joins a poll in flight and then runs a fresh one.
     */
    async sync() {
      if (running) await running;
      await poll();
    },
    /** Whether the feed was read to its end within the revocation bound. */
    fresh,
    state: () => ({ cursor, lagMs: lagMs(), fresh: fresh(), openIntents: intents.size, policy }),
    /** When (on the feed's clock) the last read that reached the end of the feed was issued. */
    lastComplete: () => lastComplete,
    stop() {
      stopped = true;
      if (timer) clearTimeout(timer);
      if (watchdog) clearInterval(watchdog);
    },
  };
}

export type InvalidationFeed = ReturnType<typeof createInvalidationFeed>;
