import type { VerificationCache } from "../cache/verification-cache.js";
import type { RateLimitCounter } from "../ratelimit/counter.js";
import type { Store } from "../storage/store.js";
import type { Principal } from "./access.js";
import { dueRefill } from "./credits.js";
import { InvalidArgumentError } from "./errors.js";
import { MAX_KEY_LENGTH, hasValidChecksum, hashKey } from "./key-format.js";
import { createPermissionQueryCache, evaluatePermissionQuery } from "./permission-query.js";
import type { CreditsTarget, IdentityRecord, KeyRecord, Ratelimit } from "./types.js";
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
 * rate limits; credits. Limits and credits are spent only when every check
 * passes: window counters are added to and taken back if anything refuses,
 * and credits are spent last, in one conditional store write.
 */
export function createVerifier(deps: {
  store: Store;
  cache: VerificationCache;
  counter: RateLimitCounter;
  now?: () => number;
  onVerification?: VerificationListener;
}) {
  const { store, cache, counter } = deps;
  const now = deps.now ?? Date.now;
  const parseQuery = createPermissionQueryCache();

  function answer(
    code: VerificationCode,
    key: KeyRecord | null,
    identity: IdentityRecord | null,
    extra: Partial<Verification> = {},
  ): Verification {
    const credits = key?.credits ?? identity?.credits ?? null;
    return { code, key, identity, creditsRemaining: credits ? credits.remaining : null, ratelimits: [], spent: 0, ...extra };
  }

  /** Limits to apply: auto-applied ones of key and identity (key wins by name) and those named in the request. */
  function selectLimits(key: KeyRecord, identity: IdentityRecord | null, input: VerifyInput): Applied[] {
    const byName = new Map<string, Applied>();
    for (const l of identity?.ratelimits ?? []) byName.set(l.name, { limit: l, counterKey: `i:${identity!.id}:${l.name}:${l.durationMs}`, cost: 1 });
    for (const l of key.ratelimits) byName.set(l.name, { limit: l, counterKey: `k:${key.id}:${l.name}:${l.durationMs}`, cost: 1 });
    const applied = new Map<string, Applied>();
    for (const [name, a] of byName) if (a.limit.autoApply) applied.set(name, a);
    input.ratelimits.forEach((r, i) => {
      const a = byName.get(r.name);
      if (!a) throw new InvalidArgumentError(`ratelimits[${i}].name`, `the key and its identity have no limit named "${r.name}"`);
      applied.set(r.name, { ...a, cost: r.cost ?? 1 });
    });
    return [...applied.values()];
  }

  async function applyLimits(applied: Applied[], t: number): Promise<{ ok: boolean; results: AppliedRatelimit[] }> {
    const added = await Promise.allSettled(applied.map((a) => counter.add(a.counterKey, a.cost, a.limit.durationMs)));
    let ok = true;
    let failure: unknown = null;
    const results: AppliedRatelimit[] = added.map((r, i) => {
      const { limit } = applied[i];
      if (r.status === "rejected") {
        failure ??= r.reason;
        return { name: limit.name, limit: limit.limit, remaining: 0, resetAt: t, exceeded: false };
      }
      // A check (cost 0) is refused when nothing is left; a spend when it went past the limit.
      const exceeded = applied[i].cost > 0 ? r.value.total > limit.limit : r.value.total >= limit.limit;
      if (exceeded) ok = false;
      return {
        name: limit.name,
        limit: limit.limit,
        remaining: Math.max(0, limit.limit - r.value.total),
        resetAt: t + r.value.resetInMs,
        exceeded,
      };
    });
    if (failure !== null || !ok) {
      await refund(applied, added.map((r) => r.status === "fulfilled"));
      if (failure !== null) throw failure;
      // Report what is left once this refused call has been taken back, also for
      // the limit that refused it (a cost of 3 with 1 left leaves 1, not 0).
      results.forEach((r, i) => {
        const total = (added[i] as PromiseFulfilledResult<{ total: number }>).value.total - applied[i].cost;
        r.remaining = Math.min(r.limit, Math.max(0, r.limit - total));
      });
    }
    return { ok, results };
  }

  async function refund(applied: Applied[], which: boolean[]): Promise<void> {
    await Promise.all(applied.map((a, i) => (which[i] ? counter.subtract(a.counterKey, a.cost, a.limit.durationMs) : undefined)));
  }

  /** Spends credits from the key's balance, else its identity's; refreshes the cached refill time. */
  async function spend(key: KeyRecord, identity: IdentityRecord | null, cost: number, t: number) {
    const owner = key.credits ? "key" : identity?.credits ? "identity" : null;
    if (owner === null) return { ok: true, remaining: null as number | null };
    const credits = owner === "key" ? key.credits! : identity!.credits!;
    const target: CreditsTarget = owner === "key" ? { keyId: key.id } : { identityId: identity!.id };
    const due = dueRefill(credits.refill, t);
    const res = await store.spendCredits(target, cost, due !== null ? { periodStart: due, amount: credits.refill!.amount } : null);
    if (res.remaining !== null) {
      // Keep this instance's cached balance (and refill time) current, so refused
      // answers report a recent balance and the refill is not attempted again.
      const refreshed = {
        remaining: res.remaining,
        refill: credits.refill && due !== null ? { ...credits.refill, lastRefillAt: due } : credits.refill,
      };
      if (owner === "key") cache.patchKey(key.hash, { ...key, credits: refreshed });
      else cache.patchIdentity({ ...identity!, credits: refreshed });
    }
    return res;
  }

  async function run(principal: Principal, input: VerifyInput, t: number): Promise<Verification> {
    // A root key scoped to other apis gets NOT_FOUND below, as for any key it cannot see.
    if (!principal.hasAny("verify")) principal.require("verify", null);
    checkInput(input);
    const query = input.permissions.trim() === "" ? null : parseQuery("permissions", input.permissions);

    if (input.key.length > MAX_KEY_LENGTH || !hasValidChecksum(input.key)) return answer("NOT_FOUND", null, null);
    const key = await cache.getKeyByHash(hashKey(input.key));
    if (!key || !principal.can("verify", key.apiId)) return answer("NOT_FOUND", null, null);
    // A key of another api is NOT_FOUND to the caller, but still counted in the key's usage.
    if (input.apiId !== "" && key.apiId !== input.apiId) return answer("NOT_FOUND", key, null);
    const identity = key.identityId ? await cache.getIdentity(key.identityId) : null;
    const applied = selectLimits(key, identity, input);

    if (!key.enabled) return answer("DISABLED", key, identity);
    if (key.expiresAt !== null && key.expiresAt <= t) return answer("EXPIRED", key, identity);
    if (query && !evaluatePermissionQuery(query, key.permissions)) return answer("INSUFFICIENT_PERMISSIONS", key, identity);

    const limits = applied.length > 0 ? await applyLimits(applied, t) : { ok: true, results: [] };
    if (!limits.ok) return answer("RATE_LIMITED", key, identity, { ratelimits: limits.results });

    const cost = input.cost ?? 1;
    let credits;
    try {
      credits = await spend(key, identity, cost, t);
    } catch (err) {
      await refund(applied, applied.map(() => true));
      throw err;
    }
    if (!credits.ok) {
      await refund(applied, applied.map(() => true));
      const results = limits.results.map((r, i) => ({ ...r, remaining: Math.min(r.limit, r.remaining + applied[i].cost) }));
      return answer("USAGE_EXCEEDED", key, identity, { ratelimits: results, creditsRemaining: credits.remaining });
    }
    return answer("VALID", key, identity, {
      ratelimits: limits.results,
      creditsRemaining: credits.remaining,
      spent: credits.remaining === null ? 0 : cost,
    });
  }

  return async function verify(principal: Principal, input: VerifyInput): Promise<Verification> {
    const t = now();
    const v = await run(principal, input, t);
    deps.onVerification?.(v, input, t);
    return v;
  };
}

export type Verifier = ReturnType<typeof createVerifier>;
