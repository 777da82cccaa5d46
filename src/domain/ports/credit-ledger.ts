import type { RefillDue } from "../credits.js";
import type { Credits, CreditsOp, CreditsTarget } from "../types.js";

/**
 * A spend's outcome. For a limited balance, `refilledAt` is its refill time
 * after the spend (null without a refill rule): what `returnCredits` checks.
 */
export type SpendResult = { ok: boolean; remaining: number; refilledAt?: number | null } | { ok: true; remaining: null };

/**
 * What a credit spend is told about its verification's call: whether it has
 * ended (AbortSignal satisfies this; so does the lean gRPC path's call state,
 * which makes an AbortSignal only when `toAbortSignal` is asked — an
 * AbortController per spend is measurable on the hot path).
 */
export interface CommitSignal {
  readonly aborted: boolean;
  readonly reason: unknown;
  throwIfAborted(): void;
  toAbortSignal?(): AbortSignal;
}

/** An AbortSignal for `signal`, made only if it is not one already. */
export function abortSignalOf(signal: CommitSignal | undefined): AbortSignal | undefined {
  if (signal === undefined || signal instanceof AbortSignal) return signal;
  return signal.toAbortSignal?.();
}

/**
 * Where credit balances are kept. The rule (a due refill first, then the spend
 * or operation) is the domain's (src/domain/credits.ts); a ledger applies it to
 * the stored balance atomically, inside its transaction, lock or conditional
 * update — read-modify-write never happens in the caller.
 */
export interface CreditLedger {
  /**
   * Atomically changes a balance: `refill` (when the domain found one due) is
   * applied first if the stored balance was not refilled for that period yet,
   * then `op` (domain/credits.ts applyCreditsOp). Returns the new credits
   * (null = unlimited) or undefined when the target does not exist.
   */
  updateCredits(target: CreditsTarget, op: CreditsOp, now: number, refill: RefillDue | null): Promise<Credits | null | undefined>;

  /**
   * Spends `cost` credits from the target's balance if it holds that many, all
   * or nothing. With `refill`, a balance last refilled before
   * `refill.periodStart` is first set to `refill.amount` — a compare-and-set on
   * the refill time, so each period's refill happens exactly once however many
   * instances race. An unlimited (or vanished) balance spends nothing and
   * answers `{ ok: true, remaining: null }`. A key whose balance moved by a
   * reroll (`creditsKeyId`) spends from the key it moved to.
   *
   * `signal` is the verification's: once it has aborted, the store writes
   * nothing and rejects with its reason. The store checks it at the last
   * moment before the write (after waiting for a lock, for instance): that
   * write is the verification's commit point. It is an AbortSignal or the
   * lean gRPC path's cheaper call state (CommitSignal); a store that must be
   * told when it aborts asks `toAbortSignal()` for one.
   */
  spendCredits(target: CreditsTarget, cost: number, refill: RefillDue | null, signal?: CommitSignal): Promise<SpendResult>;

  /**
   * Gives back `cost` credits a spend took (a verification whose call ended
   * while its spend was being written), only if the balance is still in the
   * refill period the spend was made in (`refilledAt`, from its SpendResult):
   * a refill since has set the balance anew. Returns whether it gave back.
   */
  returnCredits(target: CreditsTarget, cost: number, refilledAt: number | null): Promise<boolean>;
}
