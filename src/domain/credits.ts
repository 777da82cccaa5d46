import { FailedPreconditionError } from "./errors.js";
import type { Credits, CreditsOp, Refill } from "./types.js";

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

/** A refill that is due: the balance becomes `amount` for the period starting at `periodStart`. */
export type RefillDue = { periodStart: number; amount: number };

/** The refill due at `now` for a balance with this rule, or null (what callers pass to the store). */
export function refillDueAt(credits: Credits | null, now: number): RefillDue | null {
  const refill = credits?.refill ?? null;
  const start = dueRefill(refill, now);
  return start === null ? null : { periodStart: start, amount: refill!.amount };
}

/*
 * The credit rules, in one place: a refill that is due is applied first (it SETS
 * the balance, once per period: a compare-and-set on the refill time), then the
 * spend or the operation. Stores apply them to the stored balance inside their
 * transaction or lock; the MongoDB store's conditional updates express the same
 * rule as filters (src/storage/mongodb/credits.ts).
 */

/** Applies `refill` when the balance was last refilled before its period. */
export function applyDueRefill(current: Credits, refill: RefillDue | null): { credits: Credits; changed: boolean } {
  if (refill && current.refill && current.refill.lastRefillAt < refill.periodStart) {
    return { credits: { remaining: refill.amount, refill: { ...current.refill, lastRefillAt: refill.periodStart } }, changed: true };
  }
  return { credits: current, changed: false };
}

/**
 * One verification's spend: the due refill first, then `cost` if the balance
 * covers it (all or nothing). `changed` says whether the balance must be written.
 */
export function spendFromBalance(current: Credits, cost: number, refill: RefillDue | null): { ok: boolean; credits: Credits; changed: boolean } {
  let { credits, changed } = applyDueRefill(current, refill);
  const ok = credits.remaining >= cost;
  if (ok && cost > 0) {
    credits = { ...credits, remaining: credits.remaining - cost };
    changed = true;
  }
  return { ok, credits, changed };
}

/**
 * UpdateCredits: the due refill first, then the operation — so an INCREMENT on
 * the 1st is added to the month's refilled balance instead of being wiped by the
 * next verification's refill, and a SET holds for the rest of the period. Set
 * keeps the refill rule; increment and decrement need a limited balance.
 */
export function applyCreditsOp(current: Credits | null, op: CreditsOp, refill: RefillDue | null): Credits | null {
  if (op.op === "set" && op.value === null) return null;
  const base = current ? applyDueRefill(current, refill).credits : null;
  if (op.op === "set") return { remaining: op.value!, refill: base?.refill ?? null };
  if (base === null) throw new FailedPreconditionError("credits are unlimited; SET a balance first");
  const remaining = op.op === "increment" ? base.remaining + op.value : Math.max(0, base.remaining - op.value);
  return { remaining: Math.min(remaining, Number.MAX_SAFE_INTEGER), refill: base.refill };
}
