import { randomBytes } from "node:crypto";
import type { Verification, VerificationCode, VerifyInput } from "../domain/verify.js";
import type { Logger } from "../observability/logger.js";
import type { UsageStore } from "../domain/ports/usage-store.js";
import { emptyCounts, type CounterName, type Counts, type UsageRow } from "../domain/usage.js";

const OUTCOME: Record<VerificationCode, CounterName> = {
  VALID: "valid",
  NOT_FOUND: "notFound",
  DISABLED: "disabled",
  EXPIRED: "expired",
  INSUFFICIENT_PERMISSIONS: "insufficientPermissions",
  RATE_LIMITED: "rateLimited",
  USAGE_EXCEEDED: "usageExceeded",
};

export interface RecorderOptions {
  /** Pending counts are written this often. A crash loses at most this much. */
  flushMs: number;
  /** Distinct pending (minute, key, tag) entries that trigger an early flush. */
  flushAt?: number;
  /** Most pending entries kept while the store cannot be written; beyond, new counts are dropped and counted. */
  maxPending?: number;
  /** Minute rows older than this are deleted (hour rows: `hourRetentionMs`, day rows: `dayRetentionMs`). */
  minuteRetentionMs: number;
  hourRetentionMs: number;
  /** Day rows older than this are deleted; null or absent keeps them. */
  dayRetentionMs?: number | null;
  /**
   * A key's last_used_at is written again only once it would move by at least
   * this much (0: on every flush that saw the key). Absent: 0.
   */
  lastUsedResolutionMs?: number;
}

interface Pending {
  minute: number;
  keyId: string;
  identityId: string | null;
  tag: string;
  counts: Counts;
}

/**
 * Counts verifications off the hot path. Each verification adds to an
 * in-memory entry per (minute, key, identity, tag); every `flushMs` the entries
 * are written in one batch as minute rows, from which the store derives hour
 * and day rows (src/storage: an atomic, idempotent increment per row), together with the
 * keys' last-used times. A failed flush keeps its counts for the next one.
 */
export function createUsageRecorder(deps: { store: UsageStore; logger: Logger; options: RecorderOptions; onDrop?: (n: number) => void }) {
  const { store, logger, options } = deps;
  const flushAt = options.flushAt ?? 20_000;
  const maxPending = options.maxPending ?? 500_000;
  // Pending untagged entries by key id (a string the verification cache shares,
  // so no key is built and hashed per call), each key's entries — one per minute
  // and identity, so one or two — in a list; tagged entries, whose number per key
  // is the caller's to choose, by a string of all four.
  let pending = new Map<string, Pending[]>();
  let tagged = new Map<string, Pending>();
  let pendingCount = 0;
  let lastUsed = new Map<string, number>();
  // The last_used_at this process last wrote (or is writing) per key, for keys
  // written within the last `resolution`: a use less than `resolution` after it
  // is not written again. Older entries are dropped at each flush, so the map
  // holds at most the keys used within one resolution.
  const resolution = options.lastUsedResolutionMs ?? 0;
  const written = new Map<string, number>();
  let timer: NodeJS.Timeout | null = null;
  let pruneTimer: NodeJS.Timeout | null = null;
  let flushing: Promise<void> | null = null;
  let failing = false;
  let stopped = false;
  // A batch whose write failed is retried as it was, under the same id, before
  // anything newer: the store applies a batch id at most once per row, so a
  // write that failed half-way (or whose answer was lost) is not counted twice.
  const writer = randomBytes(8).toString("hex");
  let seq = 0;
  let unsent: { rows: UsageRow[]; seq: number } | null = null;

  function add(minute: number, keyId: string, identityId: string | null, tag: string, outcome: CounterName, credits: number) {
    let e: Pending | undefined;
    let list: Pending[] | undefined;
    let id = "";
    if (tag === "") {
      list = pending.get(keyId);
      if (list) {
        for (let i = 0; i < list.length; i++) {
          const x = list[i];
          if (x.minute === minute && x.identityId === identityId) {
            e = x;
            break;
          }
        }
      }
    } else {
      id = `${minute}|${keyId}|${identityId ?? ""}|${tag}`;
      e = tagged.get(id);
    }
    if (!e) {
      if (pendingCount >= maxPending) {
        deps.onDrop?.(1);
        return;
      }
      e = { minute, keyId, identityId, tag, counts: emptyCounts() };
      if (tag !== "") tagged.set(id, e);
      else if (list) list.push(e);
      else pending.set(keyId, [e]);
      pendingCount++;
    }
    e.counts.total++;
    e.counts[outcome]++;
    e.counts.creditsSpent += credits;
  }

  function record(v: Verification, input: VerifyInput, at: number): void {
    const key = v.key;
    if (!key) return; // an unknown key belongs to no one
    const minute = at - (at % 60_000);
    const outcome = OUTCOME[v.code];
    const identityId = v.identity?.id ?? key.identityId;
    add(minute, key.id, identityId, "", outcome, v.spent);
    // A tag named twice in one request is still one verification carrying it.
    const tags = input.tags;
    if (tags.length === 1) add(minute, key.id, identityId, tags[0], outcome, v.spent);
    else if (tags.length > 1) for (const tag of new Set(tags)) add(minute, key.id, identityId, tag, outcome, v.spent);
    if (at > (lastUsed.get(key.id) ?? 0) && (resolution === 0 || at - (written.get(key.id) ?? -Infinity) >= resolution)) lastUsed.set(key.id, at);
    // Failures are logged by flushOnce and retried by the next flush; unhandled, one would end the process.
    // Early flush when many entries are pending — but not while the store is failing:
    // then the timer's retries are enough, and each call would start another attempt.
    if (pendingCount >= flushAt && !flushing && !failing) void flush().catch(() => undefined);
  }

  /** The pending entries as minute rows (the store derives hour and day rows from them). */
  function rows(): UsageRow[] {
    const minutes: UsageRow[] = [];
    const row = (e: Pending) => minutes.push({ granularity: "minute", bucket: e.minute, keyId: e.keyId, identityId: e.identityId, tag: e.tag, counts: e.counts });
    for (const list of pending.values()) list.forEach(row);
    tagged.forEach(row);
    return minutes;
  }

  async function flushOnce(): Promise<void> {
    try {
      if (unsent) {
        await store.writeUsage(unsent.rows, { writer, seq: unsent.seq });
        unsent = null;
      }
      if (pendingCount > 0) {
        const batch = { rows: rows(), seq: ++seq };
        pending = new Map();
        tagged = new Map();
        pendingCount = 0;
        unsent = batch;
        await store.writeUsage(batch.rows, { writer, seq: batch.seq });
        unsent = null;
      }
      if (resolution > 0) {
        const horizon = Date.now() - resolution;
        for (const [id, t] of written) if (t < horizon) written.delete(id);
      }
      if (lastUsed.size > 0) {
        const used = lastUsed;
        lastUsed = new Map();
        const before = resolution > 0 ? new Map([...used.keys()].map((id) => [id, written.get(id)])) : null;
        if (before) for (const [id, t] of used) written.set(id, t);
        try {
          await store.touchLastUsed(used);
        } catch (err) {
          for (const [id, t] of used) if (t > (lastUsed.get(id) ?? 0)) lastUsed.set(id, t);
          // Not written: the next use of these keys must not be held back by it.
          if (before) for (const [id, t] of before) t === undefined ? written.delete(id) : written.set(id, t);
          throw err;
        }
      }
      if (failing) logger.info("usage counts written again");
      failing = false;
    } catch (err) {
      if (!failing) logger.warn({ err: (err as Error).message, pending: pendingCount }, "cannot write usage counts; will retry");
      failing = true;
      throw err;
    }
  }

  /** Writes everything pending now (joins a flush in progress, then runs another). */
  async function flush(): Promise<void> {
    while (flushing) await flushing.catch(() => undefined);
    flushing = flushOnce().finally(() => {
      flushing = null;
    });
    return flushing;
  }

  return {
    record,
    flush,
    pendingEntries: () => pendingCount + (unsent?.rows.length ?? 0),
    start() {
      const tick = () => {
        if (stopped) return;
        timer = setTimeout(() => void flush().catch(() => undefined).finally(tick), options.flushMs);
        timer.unref();
      };
      tick();
      const prune = async () => {
        const t = Date.now();
        try {
          await store.pruneUsage("minute", t - options.minuteRetentionMs);
          await store.pruneUsage("hour", t - options.hourRetentionMs);
          if (options.dayRetentionMs) await store.pruneUsage("day", t - options.dayRetentionMs);
        } catch (err) {
          logger.warn({ err: (err as Error).message }, "cannot prune old usage rows");
        }
      };
      pruneTimer = setInterval(() => void prune(), 10 * 60_000);
      pruneTimer.unref();
      void prune();
    },
    /** Stops the timer and writes what is pending; called on graceful shutdown. */
    async stop() {
      stopped = true;
      if (timer) clearTimeout(timer);
      if (pruneTimer) clearInterval(pruneTimer);
      timer = null;
      await flush();
    },
  };
}

export type UsageRecorder = ReturnType<typeof createUsageRecorder>;
