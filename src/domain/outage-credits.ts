import { applyDueRefill, refillDueAt } from "./credits.js";
import type { CreditLedger } from "./ports/credit-ledger.js";
import type { Credits, CreditsTarget } from "./types.js";

/** Most balances one instance tracks admissions for during an outage; past it, spends on further balances are refused. */
export const MAX_OUTAGE_BALANCES = 100_000;

/** The cache entries that hold a balance, refreshed once what was admitted from it is charged. */
export interface CachedBalanceRef {
  keyHash?: string;
  identityId?: string;
}

interface Admitted {
  target: CreditsTarget;
  /** The cached balance it was admitted against (its refill rule is applied when charging). */
  credits: Credits;
  /** Credits admitted and not charged yet. */
  admitted: number;
  ref: CachedBalanceRef;
}

/** What reconciliation did with one balance. */
export interface Charged {
  target: CreditsTarget;
  admitted: number;
  charged: number;
}

/**
 * Credits admitted on trust while the store cannot be reached (the `store`
 * credits backend, LATCHKEY_OUTAGE_CREDIT_ALLOWANCE; README, "Store outages").
 *
 * The rule: while `reachable()` says the store cannot be reached, a spend of
 * `cost` from a cached balance is admitted when what this instance admitted
 * from that balance and has not charged yet, plus `cost`, is at most the
 * allowance and at most the cached balance (after a refill that is due, as the
 * store would apply it): never more than the last known balance could cover.
 * Otherwise the caller spends through the store as usual (UNAVAILABLE).
 *
 * Reconciliation charges each balance's admitted total through the ledger's
 * own spend (the credits rule, atomic in the store): all of it when the balance
 * covers it, else what the balance holds, down to zero; what could not be
 * charged is reported. A balance whose charge fails stays for the next pass.
 */
export function createOutageCredits(deps: {
  ledger: Pick<CreditLedger, "spendCredits">;
  /** Credits one instance may admit per balance while the store cannot be reached; 0 admits none. */
  allowance: number;
  reachable: () => boolean;
  maxBalances?: number;
  now?: () => number;
  /** The first admission since the store was last reachable (one log line per outage). */
  onOutageAdmission?: () => void;
  onAdmitted?: (cost: number) => void;
  /** After one balance was charged (the cached entries are refreshed). */
  onCharged?: (c: Charged, ref: CachedBalanceRef) => void;
}) {
  const { ledger, allowance, reachable } = deps;
  const maxBalances = deps.maxBalances ?? MAX_OUTAGE_BALANCES;
  const now = deps.now ?? Date.now;
  const pending = new Map<string, Admitted>();
  /**
   * The balance each of the last spends through the store left (at most
   * maxBalances, oldest dropped): the cache holds a balance as it was read,
   * before this instance's own spends since.
   */
  const seen = new Map<string, { remaining: number; refilledAt: number | null }>();
  let admittingSinceReachable = false;
  let running: Promise<boolean> | null = null;

  const keyOf = (t: CreditsTarget) => ("keyId" in t && t.keyId ? `k:${t.keyId}` : `i:${(t as { identityId: string }).identityId}`);

  /**
   * Admits `cost` from the cached balance `credits` of `target` when the store
   * cannot be reached and the rule above allows it: the balance to answer with,
   * or null (the caller then spends through the store).
   */
  function admit(target: CreditsTarget, credits: Credits, cost: number, t: number, ref: CachedBalanceRef): { ok: true; remaining: number; onTrust: true } | null {
    if (allowance <= 0 || reachable()) return null;
    const due = refillDueAt(credits, t);
    const k = keyOf(target);
    let base = applyDueRefill(credits, due).credits.remaining;
    // The lower of the cached balance and what this instance's last spend left (unless a refill is due since).
    const last = seen.get(k);
    if (last && (due === null || (last.refilledAt !== null && last.refilledAt >= due.periodStart))) base = Math.min(base, last.remaining);
    const entry = pending.get(k);
    const before = entry?.admitted ?? 0;
    if (before + cost > allowance || before + cost > base) return null;
    if (cost > 0) {
      if (entry) {
        entry.admitted += cost;
        entry.credits = credits;
        entry.ref = ref;
      } else {
        if (pending.size >= maxBalances) return null;
        pending.set(k, { target, credits, admitted: cost, ref });
      }
      if (!admittingSinceReachable) {
        admittingSinceReachable = true;
        deps.onOutageAdmission?.();
      }
      deps.onAdmitted?.(cost);
    }
    return { ok: true, remaining: base - before - cost, onTrust: true };
  }

  /** What a spend through the store left in a balance (the verifier tells it of each). */
  function observe(target: CreditsTarget, remaining: number, refilledAt: number | null): void {
    if (allowance <= 0) return;
    const k = keyOf(target);
    if (seen.size >= maxBalances && !seen.has(k)) seen.delete(seen.keys().next().value!);
    seen.set(k, { remaining, refilledAt });
  }

  /** Charges one balance's admitted total; what it charged. */
  async function charge(e: Admitted, want: number): Promise<number> {
    let ask = want;
    while (ask > 0) {
      const r = await ledger.spendCredits(e.target, ask, refillDueAt(e.credits, now()));
      // Unlimited since, or gone: nothing to charge.
      if (r.remaining === null) return 0;
      if (r.ok) return ask;
      // The balance holds less: charge what it holds (a spend of its remaining), down to zero.
      ask = Math.min(ask, r.remaining);
    }
    return 0;
  }

  async function pass(): Promise<boolean> {
    for (const [k, e] of [...pending]) {
      const want = e.admitted;
      const charged = await charge(e, want);
      // Admissions made while this one was being charged (the store went away again) stay for the next pass.
      e.admitted -= want;
      if (e.admitted <= 0) pending.delete(k);
      seen.delete(k);
      deps.onCharged?.({ target: e.target, admitted: want, charged }, e.ref);
    }
    return pending.size === 0;
  }

  return {
    /** Whether admissions on trust are on (an allowance above 0). */
    enabled: allowance > 0,
    admit,
    observe,
    /**
     * Charges every balance admitted from (one pass; joins a pass in flight).
     * Resolves true when nothing is left to charge; rejects with the store's
     * error when a charge failed (what was not charged stays).
     */
    reconcile(): Promise<boolean> {
      if (reachable()) admittingSinceReachable = false;
      if (pending.size === 0) return Promise.resolve(true);
      running ??= pass().finally(() => {
        running = null;
      });
      return running;
    },
    /** Balances with admissions not charged yet, and their credits. */
    pending(): { balances: number; credits: number } {
      let credits = 0;
      for (const e of pending.values()) credits += e.admitted;
      return { balances: pending.size, credits };
    },
  };
}

export type OutageCredits = ReturnType<typeof createOutageCredits>;
