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
