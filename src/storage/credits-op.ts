import { FailedPreconditionError } from "../domain/errors.js";
import type { Credits, CreditsOp } from "../domain/types.js";

/**
 * The new balance after `op`, for stores that apply it inside a transaction.
 * Set keeps the refill rule; increment and decrement need a limited balance.
 */
export function applyCreditsOp(current: Credits | null, op: CreditsOp): Credits | null {
  if (op.op === "set") {
    if (op.value === null) return null;
    return { remaining: op.value, refill: current?.refill ?? null };
  }
  if (current === null) throw new FailedPreconditionError("credits are unlimited; SET a balance first");
  const remaining = op.op === "increment" ? current.remaining + op.value : Math.max(0, current.remaining - op.value);
  return { remaining: Math.min(remaining, Number.MAX_SAFE_INTEGER), refill: current.refill };
}

/**
 * One verification's spend, for stores that apply it under a transaction or
 * lock: a refill that is due (its period started after the last refill) resets
 * the balance first, then `cost` is taken if the balance covers it. `changed`
 * says whether the balance must be written back.
 */
export function spendFromBalance(
  current: Credits,
  cost: number,
  refill: { periodStart: number; amount: number } | null,
): { ok: boolean; credits: Credits; changed: boolean } {
  let credits = current;
  let changed = false;
  if (refill && credits.refill && credits.refill.lastRefillAt < refill.periodStart) {
    credits = { remaining: refill.amount, refill: { ...credits.refill, lastRefillAt: refill.periodStart } };
    changed = true;
  }
  const ok = credits.remaining >= cost;
  if (ok && cost > 0) {
    credits = { ...credits, remaining: credits.remaining - cost };
    changed = true;
  }
  return { ok, credits, changed };
}
