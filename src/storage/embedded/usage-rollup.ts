import type Database from "better-sqlite3";
import { BUCKET_MS } from "../../domain/usage.js";

/*
 * Hour and day usage rows on the embedded store are derived from minute rows
 * (docs/usage-storage.md, "Hour and day rows on the embedded store"): a flush
 * upserts one minute row per (key, identity, tag), and once a minute is over
 * by a minute the rows of the minutes since the last roll-up are summed into
 * their hour and day rows by two INSERT … SELECT … GROUP BY statements. The
 * settings row `usage_rolled_up_to` (the watermark W, a minute start) says how
 * far that went: minute rows before W are counted in their hour and day rows,
 * rows from W on are not yet — a read of hours or days adds them — and a
 * minute row written late, below W (a retried batch), also upserts its hour
 * and day rows directly. The roll-up and the watermark move in one
 * transaction, so a crash anywhere leaves either both or neither.
 */

export const WATERMARK = "usage_rolled_up_to";

/**
 * Run at every open, after the tables exist: a database written by a release
 * that upserted hour and day rows with every flush has its minute rows counted
 * already, so its watermark starts just past its newest minute row.
 */
export const WATERMARK_INIT = `INSERT OR IGNORE INTO settings (name, value)
  SELECT '${WATERMARK}', coalesce(max(bucket) + ${BUCKET_MS.minute}, 0) FROM usage WHERE g = 'minute';`;

/** The counter columns, in COUNTERS order. */
export const COUNTER_COLUMNS = ["total", "valid", "not_found", "disabled", "expired", "insufficient_permissions", "rate_limited", "usage_exceeded", "credits_spent"];

/** Adds the incoming row's counters to the stored row's. */
export const ADD_COUNTERS = `ON CONFLICT (g, bucket, key_id, identity_id, tag) DO UPDATE SET ${COUNTER_COLUMNS.map((c) => `${c} = ${c} + excluded.${c}`).join(", ")}`;

/** A minute stays a minute row for this long after it is over: most flushes of it land before its roll-up. */
const ROLLUP_LAG_MS = BUCKET_MS.minute;

/** The roll-up's statements, prepared on one connection (the usage worker's or the store's). */
export function usageRollup(db: Database.Database) {
  const sums = COUNTER_COLUMNS.map((c) => `sum(${c})`).join(", ");
  const into = (g: "hour" | "day") =>
    db.prepare(`INSERT INTO usage SELECT '${g}', bucket - bucket % ${BUCKET_MS[g]}, key_id, identity_id, tag, ${sums}
      FROM usage WHERE g = 'minute' AND bucket >= ? AND bucket < ? GROUP BY 2, 3, 4, 5 ${ADD_COUNTERS}`);
  const hour = into("hour");
  const day = into("day");
  const get = db.prepare(`SELECT CAST(value AS INTEGER) AS w FROM settings WHERE name = '${WATERMARK}'`);
  const set = db.prepare(`UPDATE settings SET value = ? WHERE name = '${WATERMARK}'`);
  return {
    /** Minute rows before this are counted in their hour and day rows. Call inside a transaction. */
    watermark(): number {
      return (get.get() as { w: number } | undefined)?.w ?? 0;
    },
    /**
     * Sums the minute rows from the watermark to one minute before `now`'s
     * minute into their hour and day rows and moves the watermark there.
     * Call inside a write transaction. Returns the watermark after.
     */
    rollUp(now: number): number {
      const w = this.watermark();
      const to = now - (now % BUCKET_MS.minute) - ROLLUP_LAG_MS;
      if (to <= w) return w;
      hour.run(w, to);
      day.run(w, to);
      set.run(String(to));
      return to;
    },
  };
}

export type UsageRollup = ReturnType<typeof usageRollup>;
