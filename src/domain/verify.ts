import type { OutageCredits } from "./outage-credits.js";
import type { CommitSignal, CreditLedger, SpendResult } from "./ports/credit-ledger.js";
import type { RateLimitCounter, Taken } from "./ports/rate-limit-counter.js";
import type { VerificationCache } from "./ports/verification-cache.js";
import type { Principal } from "./access.js";
import { refillDueAt } from "./credits.js";
import { CanceledError, DeadlineExceededError, DomainError, InvalidArgumentError } from "./errors.js";
import { MAX_KEY_LENGTH, hasValidChecksum, hashKey } from "./key-format.js";
import { createPermissionQueryCache, evaluatePermissionQuery } from "./permission-query.js";
import type { Credits, CreditsTarget, IdentityRecord, KeyRecord, Ratelimit } from "./types.js";
import { LIMITS, checkApiId } from "./validation.js";

export type VerificationCode =
  | "VALID"
  | "NOT_FOUND"
  | "DISABLED"
  | "EXPIRED"
  | "INSUFFICIENT_PERMISSIONS"
  | "RATE_LIMITED"
  | "USAGE_EXCEEDED";

export interface VerifyInput {
  key: string;
  apiId: string;
  permissions: string;
  ratelimits: { name: string; cost: number | null }[];
  cost: number | null;
  tags: string[];
}

export interface AppliedRatelimit {
  name: string;
  limit: number;
  remaining: number;
  resetAt: number;
  exceeded: boolean;
}

export interface Verification {
  code: VerificationCode;
  key: KeyRecord | null;
  identity: IdentityRecord | null;
  creditsRemaining: number | null;
  ratelimits: AppliedRatelimit[];
  /** Credits actually spent (0 unless VALID). */
  spent: number;
}

/** What a verification did, for usage counting (src/usage). */
export type VerificationListener = (v: Verification, input: VerifyInput, at: number) => void;

interface Applied {
  limit: Ratelimit;
  counterKey: string;
  cost: number;
}

/**
 * Whether the call a verification runs for has ended, and why: its AbortSignal,
 * or (from the lean gRPC path) something as cheap to ask that makes the
 * AbortSignal only when a credit spend needs one — making one per call and
 * aborting it at the end was the largest single item of a cached
 * verification's profile (docs/performance.md).
 */
export type CallSignal = AbortSignal | LazyCallSignal;

/** The lean path's call state: what a credit spend is told (CommitSignal), with an AbortSignal made on request. */
export interface LazyCallSignal extends CommitSignal {
  toAbortSignal(): AbortSignal;
}

/** The call a verification runs for: its signal, and its deadline on the monotonic clock. */
interface Call {
  signal?: CallSignal;
  deadline?: number;
}

/** Tokens a verification holds in one window, given back if it does not commit. */
interface Held {
  counterKey: string;
  cost: number;
  durationMs: number;
  window: number;
}

/** What spending from no balance comes to (never changed by its readers). */
const UNLIMITED: SpendResult = Object.freeze({ ok: true, remaining: null }) as SpendResult;
const NO_LIMITS: Ratelimit[] = [];
/** A verification's rate-limit results when it applied none (shared; never changed by its readers). */
const NO_RESULTS: AppliedRatelimit[] = Object.freeze([]) as unknown as AppliedRatelimit[];
/** What taking no limits comes to (shared, like NO_RESULTS). */
const NO_LIMITS_TAKEN: { ok: boolean; results: AppliedRatelimit[]; held: Held[] } = Object.freeze({ ok: true, results: NO_RESULTS, held: Object.freeze([]) as unknown as Held[] });

function checkInput(input: VerifyInput): void {
  if (input.key === "") throw new InvalidArgumentError("key", "is required");
  if (input.apiId !== "") checkApiId("api_id", input.apiId);
  if (input.cost !== null && (!Number.isSafeInteger(input.cost) || input.cost < 0)) {
    throw new InvalidArgumentError("cost", "must be a whole number of at least 0");
  }
  if (input.ratelimits.length > LIMITS.ratelimits) {
    throw new InvalidArgumentError("ratelimits", `must have at most ${LIMITS.ratelimits} entries`);
  }
  input.ratelimits.forEach((r, i) => {
    if (!LIMITS.name.test(r.name)) throw new InvalidArgumentError(`ratelimits[${i}].name`, "must be 1-128 characters of letters, digits and _ . : -");
    if (r.cost !== null && (!Number.isSafeInteger(r.cost) || r.cost < 0)) {
      throw new InvalidArgumentError(`ratelimits[${i}].cost`, "must be a whole number of at least 0");
    }
  });
  if (input.tags.length > LIMITS.maxTags) throw new InvalidArgumentError("tags", `must have at most ${LIMITS.maxTags} entries`);
  input.tags.forEach((t, i) => {
    if (t.length === 0 || t.length > LIMITS.tag || /[\u0000-\u001f]/.test(t)) {
      throw new InvalidArgumentError(`tags[${i}]`, `must be 1-${LIMITS.tag} printable characters`);
    }
  });
}

/**
 * VerifyKey. Checks, in order: the key exists (checksum first, then the cache,
 * then the store) and belongs to the api; enabled; not expired; permissions;
 * rate limits; credits.
 *
 * Rate limits are taken first, each only if it fits (exact admission, see
 * src/ratelimit/counter.ts); if any refuses, the others are given back to the
 * windows they were taken from. Then comes the commit point: the credit spend,
 * one conditional store write (or, for a verification without credits, the
 * moment after its limits are taken). A verification whose signal aborted —
 * deadline passed, client cancelled — before its commit point spends nothing:
 * its window tokens are given back and the store is told not to write (the
 * store checks the signal once it holds what it needs to write); nor does one
 * with no more than the commit margin of its deadline left. A spend that
 * completes after the call ended is given back when the balance is still in the
 * same refill period. Otherwise the verification stands, answered or not. See
 * README "Deadlines and the commit point".
 */
export function createVerifier(deps: {
  store: Pick<CreditLedger, "spendCredits" | "returnCredits">;
  cache: VerificationCache;
  counter: RateLimitCounter;
  now?: () => number;
  /** No commit with less than this much of the call's deadline left (LATCHKEY_COMMIT_MARGIN_MS). Default 1. */
  commitMarginMs?: number;
  /** A monotonic clock in ms for deadlines (default performance.now). */
  monotonic?: () => number;
  onVerification?: VerificationListener;
  /** Credits admitted on trust while the store cannot be reached (LATCHKEY_OUTAGE_CREDIT_ALLOWANCE); none without. */
  outageCredits?: Pick<OutageCredits, "admit" | "observe" | "enabled">;
}) {
  const { store, cache, counter } = deps;
  const trust = deps.outageCredits?.enabled ? deps.outageCredits : null;
  const now = deps.now ?? Date.now;
  const monotonic = deps.monotonic ?? (() => performance.now());
  const margin = deps.commitMarginMs ?? 1;
  const parseQuery = createPermissionQueryCache();

  /** The answer; the balance left is the cached one unless the spend said otherwise. Built field by field (no spread: it runs per call). */
  function answer(
    code: VerificationCode,
    key: KeyRecord | null,
    identity: IdentityRecord | null,
    ratelimits: AppliedRatelimit[] = NO_RESULTS,
    creditsRemaining?: number | null,
    spent = 0,
  ): Verification {
    if (creditsRemaining === undefined) {
      const credits = key?.credits ?? identity?.credits ?? null;
      creditsRemaining = credits ? credits.remaining : null;
    }
    return { code, key, identity, creditsRemaining, ratelimits, spent };
  }

  /**
   * Limits to apply: auto-applied ones of key and identity (key wins by name) and
   * those named in the request. A key rerolled from another counts against the
   * windows of the first key of its chain (`ratelimitKeyId`), so old and new key
   * share one set of windows during the grace period.
   */
  function selectLimits(key: KeyRecord, identity: IdentityRecord | null, input: VerifyInput): Applied[] {
    const own = identity?.ratelimits ?? NO_LIMITS;
    if (input.ratelimits.length === 0 && (own.length === 0 || key.ratelimits.length === 0)) {
      // Limits of one record only, none named in the request (names are unique within a record): its auto-applied ones.
      const out: Applied[] = [];
      if (own.length > 0) {
        for (const l of own) if (l.autoApply) out.push({ limit: l, counterKey: `i:${identity!.id}:${l.name}:${l.durationMs}`, cost: 1 });
      } else {
        const windowsOf = key.ratelimitKeyId ?? key.id;
        for (const l of key.ratelimits) if (l.autoApply) out.push({ limit: l, counterKey: `k:${windowsOf}:${l.name}:${l.durationMs}`, cost: 1 });
      }
      return out;
    }
    const byName = new Map<string, Applied>();
    const windowsOf = key.ratelimitKeyId ?? key.id;
    for (const l of identity?.ratelimits ?? []) byName.set(l.name, { limit: l, counterKey: `i:${identity!.id}:${l.name}:${l.durationMs}`, cost: 1 });
    for (const l of key.ratelimits) byName.set(l.name, { limit: l, counterKey: `k:${windowsOf}:${l.name}:${l.durationMs}`, cost: 1 });
    const applied = new Map<string, Applied>();
    for (const [name, a] of byName) if (a.limit.autoApply) applied.set(name, a);
    input.ratelimits.forEach((r, i) => {
      const a = byName.get(r.name);
      if (!a) throw new InvalidArgumentError(`ratelimits[${i}].name`, `the key and its identity have no limit named "${r.name}"`);
      applied.set(r.name, { ...a, cost: r.cost ?? 1 });
    });
    return [...applied.values()];
  }

  /** Takes every applied limit; all or nothing: if one refuses (or fails), the others are given back. */
  async function takeLimits(applied: Applied[]): Promise<{ ok: boolean; results: AppliedRatelimit[]; held: Held[] }> {
    if (applied.length === 1) {
      // One limit (the usual case): nothing to give back to another window if it refuses or fails.
      const { limit, counterKey, cost } = applied[0];
      const r = await counter.take(counterKey, cost, limit.limit, limit.durationMs);
      const held: Held[] = r.ok && cost > 0 ? [{ counterKey, cost, durationMs: limit.durationMs, window: r.window }] : [];
      const result = { name: limit.name, limit: limit.limit, remaining: Math.min(limit.limit, Math.max(0, limit.limit - r.total)), resetAt: r.resetAt, exceeded: !r.ok };
      return { ok: r.ok, results: [result], held };
    }
    const taken = await Promise.allSettled(applied.map((a) => counter.take(a.counterKey, a.cost, a.limit.limit, a.limit.durationMs)));
    const held: Held[] = [];
    let ok = true;
    let failure: unknown = null;
    taken.forEach((r, i) => {
      if (r.status === "rejected") failure ??= r.reason;
      else if (!r.value.ok) ok = false;
      else if (applied[i].cost > 0) {
        const a = applied[i];
        held.push({ counterKey: a.counterKey, cost: a.cost, durationMs: a.limit.durationMs, window: r.value.window });
      }
    });
    if (failure !== null || !ok) {
      await giveBack(held);
      if (failure !== null) throw failure;
    }
    const results = taken.map((r, i): AppliedRatelimit => {
      const { limit, cost } = applied[i];
      const { ok: fit, total, resetAt } = (r as PromiseFulfilledResult<Taken>).value;
      // What is left after this verification: once a refused one is given back,
      // the tokens it took are left again (a cost of 3 with 1 left leaves 1, not 0).
      const after = fit && cost > 0 && !ok ? total - cost : total;
      return { name: limit.name, limit: limit.limit, remaining: Math.min(limit.limit, Math.max(0, limit.limit - after)), resetAt, exceeded: !fit };
    });
    return { ok, results, held: ok ? held : [] };
  }

  /** Gives tokens back to the windows they were taken from. */
  async function giveBack(held: Held[]): Promise<void> {
    await Promise.all(held.map((h) => counter.refund(h.counterKey, h.cost, h.durationMs, h.window)));
  }

  /**
   * Where a verification's credits come from: a key rerolled away spends from the
   * key its balance moved to (`creditsKeyId`), a key with a balance from its own,
   * else its identity's shared balance; null when unlimited.
   */
  function creditsOwner(key: KeyRecord, identity: IdentityRecord | null): { target: CreditsTarget; credits: Credits } | null {
    if (key.creditsKeyId && key.credits) return { target: { keyId: key.creditsKeyId }, credits: key.credits };
    if (key.credits) return { target: { keyId: key.id }, credits: key.credits };
    if (identity?.credits) return { target: { identityId: identity.id }, credits: identity.credits };
    return null;
  }

  /** Spends credits from a balance (the commit point); the store writes nothing once `signal` has aborted. */
  async function spend(
    owner: { target: CreditsTarget; credits: Credits },
    cost: number,
    t: number,
    signal: CallSignal | undefined,
    key: KeyRecord,
    identity: IdentityRecord | null,
  ): Promise<SpendResult> {
    if (trust !== null) {
      // The store cannot be reached and the balance is the cached one: admitted on trust, within the allowance.
      const admitted = trust.admit(owner.target, owner.credits, cost, t, "keyId" in owner.target ? { keyHash: key.hash } : { identityId: identity?.id });
      if (admitted !== null) return admitted;
      const spent = await store.spendCredits(owner.target, cost, refillDueAt(owner.credits, t), signal);
      if (spent.remaining !== null) trust.observe(owner.target, spent.remaining, spent.refilledAt ?? null);
      return spent;
    }
    return store.spendCredits(owner.target, cost, refillDueAt(owner.credits, t), signal);
  }

  async function run(principal: Principal, input: VerifyInput, t: number, call: Call): Promise<Verification> {
    const { signal, deadline } = call;
    // A root key scoped to other apis gets NOT_FOUND below, as for any key it cannot see.
    if (!principal.hasAny("verify")) principal.require("verify", null);
    checkInput(input);
    const query = input.permissions.trim() === "" ? null : parseQuery("permissions", input.permissions);

    if (input.key.length > MAX_KEY_LENGTH) return answer("NOT_FOUND", null, null);
    const hash = hashKey(input.key);
    // The checksum keeps made-up keys away from the store. A key the cache holds
    // (as a key or as unknown) passed it when it was first looked up, so only a
    // lookup the cache cannot answer checks it; a cached one needs no await either.
    let key = cache.cachedKey(hash);
    if (key === undefined) {
      if (!hasValidChecksum(input.key)) return answer("NOT_FOUND", null, null);
      key = await cache.getKeyByHash(hash);
    }
    if (!key || !principal.can("verify", key.apiId)) return answer("NOT_FOUND", null, null);
    // A key of another api is NOT_FOUND to the caller, but still counted in the key's usage.
    if (input.apiId !== "" && key.apiId !== input.apiId) return answer("NOT_FOUND", key, null);
    let identity: IdentityRecord | null = null;
    if (key.identityId) {
      const held = cache.cachedIdentity(key.identityId);
      identity = held === undefined ? await cache.getIdentity(key.identityId) : held;
    }
    const applied = selectLimits(key, identity, input);

    if (!key.enabled) return answer("DISABLED", key, identity);
    if (key.expiresAt !== null && key.expiresAt <= t) return answer("EXPIRED", key, identity);
    if (query && !evaluatePermissionQuery(query, key.permissions)) return answer("INSUFFICIENT_PERMISSIONS", key, identity);

    signal?.throwIfAborted();
    const limits = applied.length > 0 ? await takeLimits(applied) : NO_LIMITS_TAKEN;
    if (!limits.ok) return answer("RATE_LIMITED", key, identity, limits.results);

    const cost = input.cost ?? 1;
    const owner = creditsOwner(key, identity);
    let credits;
    try {
      // Not yet committed: a verification cancelled while it took its limits spends nothing,
      // nor one whose answer could not reach the client before its deadline.
      signal?.throwIfAborted();
      if (deadline !== undefined && deadline - monotonic() <= margin) {
        throw new DeadlineExceededError("too little of the call's deadline was left to commit the verification; nothing was spent");
      }
      // No balance to spend from (the usual case): no store call, and no await.
      credits = owner === null ? UNLIMITED : await spend(owner, cost, t, signal, key, identity);
    } catch (err) {
      await giveBack(limits.held);
      throw err;
    }
    if (credits.ok && credits.remaining !== null && cost > 0 && !("onTrust" in credits) && (signal?.aborted || (deadline !== undefined && monotonic() >= deadline))) {
      // The call ended while the spend was being written (a slow write, an fsync):
      // the client will not see this answer, so the spend is given back if it still
      // can be (same refill period). If it cannot, the verification stands.
      const returned = await store.returnCredits(owner!.target, cost, ("refilledAt" in credits ? credits.refilledAt : null) ?? null).catch(() => false);
      if (returned) {
        await giveBack(limits.held);
        throw signal?.aborted ? signal.reason : new DeadlineExceededError("the call's deadline passed while its credits were being spent; they were given back");
      }
    }
    if (!credits.ok) {
      await giveBack(limits.held);
      const results = limits.results.map((r, i) => ({ ...r, remaining: Math.min(r.limit, r.remaining + applied[i].cost) }));
      return answer("USAGE_EXCEEDED", key, identity, results, credits.remaining);
    }
    return answer("VALID", key, identity, limits.results, credits.remaining, credits.remaining === null ? 0 : cost);
  }

  /**
   * Verifies `input`. `call.signal` is the call's: when it aborts (deadline,
   * cancellation) before the commit point, nothing is spent and the call
   * rejects (DEADLINE_EXCEEDED, CANCELED). `call.timeoutMs` is what is left of
   * its deadline: with no more than the commit margin left at the commit point,
   * the verification does not commit (DEADLINE_EXCEEDED).
   */
  return async function verify(principal: Principal, input: VerifyInput, call: { signal?: CallSignal; timeoutMs?: number } = {}): Promise<Verification> {
    const t = now();
    const { signal } = call;
    let v: Verification;
    try {
      v = await run(principal, input, t, { signal, deadline: call.timeoutMs === undefined ? undefined : monotonic() + call.timeoutMs });
    } catch (err) {
      throw signal?.aborted && err === signal.reason ? abortError(err) : err;
    }
    deps.onVerification?.(v, input, t);
    return v;
  };
}

export type Verifier = ReturnType<typeof createVerifier>;

/**
 * Why an aborted verification stopped, as an error the RPC layer maps to a
 * status: the transport's own reason when it is one (Connect-Node aborts with a
 * ConnectError), else DEADLINE_EXCEEDED for a timeout and CANCELED otherwise.
 */
function abortError(reason: unknown): unknown {
  if (reason instanceof DomainError || (reason instanceof Error && reason.name === "ConnectError")) return reason;
  if (reason instanceof Error && reason.name === "TimeoutError") return new DeadlineExceededError("the call's deadline passed before the verification's commit point; nothing was spent");
  return new CanceledError("the call was cancelled before the verification's commit point; nothing was spent");
}
