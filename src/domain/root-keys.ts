import type { RootKeyRepository } from "./ports/root-keys.js";
import { Principal } from "./access.js";
import { ResourceExhaustedError, StoreUnreachableError, UnauthenticatedError } from "./errors.js";
import { newId } from "./ids.js";
import { generateKey, hasValidChecksum, hashKey } from "./key-format.js";
import type { RootKeyRecord, RootPermission } from "./types.js";

export const ROOT_KEY_PREFIX = "lkroot";

/** Creates a root key; the plaintext is returned here only. */
export async function createRootKey(
  store: RootKeyRepository,
  name: string,
  permissions: RootPermission[],
  opts: { first?: boolean; now?: number } = {},
): Promise<{ plaintext: string; record: RootKeyRecord } | null> {
  const t = opts.now ?? Date.now();
  const secret = generateKey(ROOT_KEY_PREFIX, 24);
  const record: RootKeyRecord = { id: newId("root", t), name, hash: secret.hash, start: secret.start, permissions, createdAt: t };
  if (opts.first) {
    return (await store.createFirstRootKey(record)) ? { plaintext: secret.plaintext, record } : null;
  }
  await store.createRootKey(record);
  return { plaintext: secret.plaintext, record };
}

/** Bounds of the authenticator's memory and of the store lookups unknown root keys may cause. */
export interface RootKeyCacheLimits {
  /** Root keys found in the store, remembered (and rechecked after `cacheMs`). */
  validEntries: number;
  /** Root keys not found, remembered for `cacheMs` (by hash: 64 characters each). */
  invalidEntries: number;
  /** Store lookups per second for root keys this process has not seen valid (also the burst). */
  unknownLookupsPerSecond: number;
}

export const DEFAULT_ROOT_KEY_CACHE_LIMITS: RootKeyCacheLimits = { validEntries: 10_000, invalidEntries: 10_000, unknownLookupsPerSecond: 100 };

/**
 * Checks `authorization: Bearer <root key>` headers. Verified root keys are
 * remembered for `cacheMs`, so revocation takes effect within that time.
 *
 * Made-up root keys cost little and displace nothing:
 * - a malformed key or a bad checksum is refused without a lookup;
 * - keys the store does not have are remembered apart from the valid ones, in a
 *   bounded FIFO, so a flood of them never evicts a valid key;
 * - a key this process has not seen valid takes one token of a per-process
 *   budget (`unknownLookupsPerSecond`) for its store lookup; with the budget
 *   spent it is answered RESOURCE_EXHAUSTED (retry shortly) without a lookup. A
 *   key seen valid before is rechecked outside the budget, so a flood of made-up
 *   keys cannot lock out the root keys in use; concurrent checks of one key share
 *   one lookup.
 *
 * While the store cannot be reached (the lookup fails with
 * StoreUnreachableError), a root key found valid at most `outageMs` ago keeps
 * working, and is checked again at its next use once the store answers. A root
 * key never seen valid gets UNAVAILABLE.
 */
export function createRootKeyAuthenticator(deps: {
  store: RootKeyRepository;
  cacheMs: number;
  now?: () => number;
  limits?: RootKeyCacheLimits;
  /** How long a root key checked valid keeps working while the store cannot be reached (LATCHKEY_OUTAGE_CACHE_MS). Default 0. */
  outageMs?: number;
  /** Called for each call let in that way. */
  onStaleAnswer?: () => void;
  /** Whether the store is reachable (its guard's view): while it is not, such a root key is let in without trying it. */
  reachable?: () => boolean;
}) {
  const now = deps.now ?? Date.now;
  const limits = deps.limits ?? DEFAULT_ROOT_KEY_CACHE_LIMITS;
  // Keyed by the plaintext so a hit costs no hashing; only keys found in the store get here.
  const valid = new Map<string, { principal: Principal; until: number; checkedAt: number }>();
  const outageMs = deps.outageMs ?? 0;
  // Keyed by hash: a bounded size per entry whatever the client sent.
  const invalid = new Map<string, number>();
  const inflight = new Map<string, Promise<Principal | null>>();
  let budget = limits.unknownLookupsPerSecond;
  let budgetAt = now();

  function takeBudget(t: number): boolean {
    budget = Math.min(limits.unknownLookupsPerSecond, budget + ((t - budgetAt) * limits.unknownLookupsPerSecond) / 1000);
    budgetAt = t;
    if (budget < 1) return false;
    budget -= 1;
    return true;
  }

  function remember<V>(map: Map<string, V>, key: string, value: V, max: number): void {
    map.delete(key);
    if (map.size >= max) map.delete(map.keys().next().value!);
    map.set(key, value);
  }

  function lookup(token: string, hash: string): Promise<Principal | null> {
    let p = inflight.get(token);
    if (!p) {
      const checkedAt = now();
      p = deps.store.getRootKeyByHash(hash).then((rec) => {
        const until = now() + deps.cacheMs;
        if (!rec) {
          valid.delete(token);
          remember(invalid, hash, until, limits.invalidEntries);
          return null;
        }
        const principal = new Principal(rec.id, rec.permissions);
        remember(valid, token, { principal, until, checkedAt }, limits.validEntries);
        return principal;
      });
      inflight.set(token, p);
      const done = () => inflight.delete(token);
      p.then(done, done);
    }
    return p;
  }

  // The last header parsed and its token: a call is checked at the door and again by the
  // auth interceptor, and a client sends the same header call after call.
  let lastHeader = "";
  let lastToken = "";

  /** The principal of a header whose root key was checked valid and is still cached, without a promise; else undefined. */
  function cached(header: string | null): Principal | undefined {
    if (!header || header !== lastHeader) return undefined;
    const known = valid.get(lastToken);
    return known && known.until > now() ? known.principal : undefined;
  }

  async function authenticate(header: string | null): Promise<Principal> {
    if (!header) throw new UnauthenticatedError("missing authorization header: send `authorization: Bearer <root key>`");
    let token: string;
    if (header === lastHeader) token = lastToken;
    else {
      const m = /^Bearer\s+(\S+)$/i.exec(header.trim());
      if (!m) throw new UnauthenticatedError("authorization header must be `Bearer <root key>`");
      token = m[1];
      lastHeader = header;
      lastToken = token;
    }
    const t = now();
    const known = valid.get(token);
    if (known && known.until > t) return known.principal;
    if (!token.startsWith(ROOT_KEY_PREFIX + "_") || !hasValidChecksum(token)) throw new UnauthenticatedError("invalid root key");
    const hash = hashKey(token);
    const refused = invalid.get(hash);
    if (refused !== undefined && refused > t) throw new UnauthenticatedError("invalid root key");
    if (!known && !inflight.has(token) && !takeBudget(t)) {
      throw new ResourceExhaustedError("too many unknown root keys are being tried; retry shortly");
    }
    const stale = () => known && now() - known.checkedAt <= outageMs;
    if (deps.reachable && !deps.reachable() && stale()) {
      deps.onStaleAnswer?.();
      return known!.principal;
    }
    let principal: Principal | null;
    try {
      principal = await lookup(token, hash);
    } catch (err) {
      if (!(err instanceof StoreUnreachableError && stale())) throw err;
      deps.onStaleAnswer?.();
      return known!.principal;
    }
    if (!principal) throw new UnauthenticatedError("invalid root key");
    return principal;
  }
  return Object.assign(authenticate, { cached });
}

export type RootKeyAuthenticator = ReturnType<typeof createRootKeyAuthenticator>;
