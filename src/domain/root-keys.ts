import type { Store } from "../storage/store.js";
import { Principal } from "./access.js";
import { UnauthenticatedError } from "./errors.js";
import { newId } from "./ids.js";
import { generateKey, hasValidChecksum, hashKey } from "./key-format.js";
import type { RootKeyRecord, RootPermission } from "./types.js";

export const ROOT_KEY_PREFIX = "lkroot";

/** Creates a root key; the plaintext is returned here only. */
export async function createRootKey(
  store: Store,
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

/**
 * Checks `authorization: Bearer <root key>` headers. Verified root keys are
 * remembered for `cacheMs`, so revocation takes effect within that time.
 */
export function createRootKeyAuthenticator(deps: { store: Store; cacheMs: number; now?: () => number }) {
  const now = deps.now ?? Date.now;
  const cache = new Map<string, { principal: Principal | null; until: number }>();
  const MAX_CACHED = 10_000;

  return async function authenticate(header: string | null): Promise<Principal> {
    if (!header) throw new UnauthenticatedError("missing authorization header: send `authorization: Bearer <root key>`");
    const m = /^Bearer\s+(\S+)$/i.exec(header.trim());
    if (!m) throw new UnauthenticatedError("authorization header must be `Bearer <root key>`");
    const token = m[1];
    const t = now();
    // Keyed by the plaintext so a hit costs no hashing; the map lives in this process only.
    const hit = cache.get(token);
    if (hit && hit.until > t) {
      if (!hit.principal) throw new UnauthenticatedError("invalid root key");
      return hit.principal;
    }
    if (!token.startsWith(ROOT_KEY_PREFIX + "_") || !hasValidChecksum(token)) throw new UnauthenticatedError("invalid root key");
    const hash = hashKey(token);
    const rec = await deps.store.getRootKeyByHash(hash);
    const principal = rec ? new Principal(rec.id, rec.permissions) : null;
    if (cache.size >= MAX_CACHED) cache.delete(cache.keys().next().value!);
    cache.set(token, { principal, until: t + deps.cacheMs });
    if (!principal) throw new UnauthenticatedError("invalid root key");
    return principal;
  };
}

export type RootKeyAuthenticator = ReturnType<typeof createRootKeyAuthenticator>;
