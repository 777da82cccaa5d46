import type { Refill } from "./types.js";

const DAY = 86_400_000;

/**
 * Start of the refill period that contains `now` (UTC). A daily refill period
 * starts at midnight; a monthly one at midnight of `refillDay`, or of the last
 * day of a month that is shorter.
 */
export function refillPeriodStart(refill: Refill, now: number): number {
  if (refill.interval === "daily") return Math.floor(now / DAY) * DAY;
  const d = new Date(now);
  const day = refill.refillDay ?? 1;
  const startIn = (y: number, m: number) => {
    const last = new Date(Date.UTC(y, m + 1, 0)).getUTCDate();
    return Date.UTC(y, m, Math.min(day, last));
  };
  const thisMonth = startIn(d.getUTCFullYear(), d.getUTCMonth());
  return thisMonth <= now ? thisMonth : startIn(d.getUTCFullYear(), d.getUTCMonth() - 1);
}

/** The period start when a refill is due at `now`, else null. */
export function dueRefill(refill: Refill | null, now: number): number | null {
  if (!refill) return null;
  const start = refillPeriodStart(refill, now);
  return start > refill.lastRefillAt ? start : null;
}
