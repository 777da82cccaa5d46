import { PermissionDeniedError } from "./errors.js";
import type { RootAction, RootPermission } from "./types.js";

/**
 * The caller of an RPC: the root key that authenticated it and what it may do.
 * A grant without an api is global (every api, and identities); a grant with an
 * api covers that api's keys only.
 */
export class Principal {
  constructor(
    readonly rootKeyId: string,
    readonly permissions: readonly RootPermission[],
  ) {}

  /** May the caller do `action` on keys of `apiId` (or, with null, globally)? */
  can(action: RootAction, apiId: string | null): boolean {
    return this.permissions.some((p) => p.action === action && (p.apiId === null || p.apiId === apiId));
  }

  /** True when the caller holds `action` for at least one api or globally. */
  hasAny(action: RootAction): boolean {
    return this.permissions.some((p) => p.action === action);
  }

  /**
   * Identities belong to no api: reading, creating, changing an identity, or
   * linking a key to one (which lets the key show the identity's meta and spend
   * its shared credits and rate limits), needs the global grant.
   */
  requireForIdentities(action: RootAction, what = "identities are shared by every api"): void {
    if (!this.can(action, null)) {
      throw new PermissionDeniedError(`${what}: this needs the global "${action}" permission; a root key scoped to an api has no access to identities`);
    }
  }

  require(action: RootAction, apiId: string | null): void {
    if (!this.can(action, apiId)) {
      throw new PermissionDeniedError(
        apiId === null ? `root key lacks the global "${action}" permission` : `root key lacks "${action}" for api "${apiId}"`,
      );
    }
  }
}

/** Parses `read`, `verify:api_1` or `*` (all four actions) into grants. */
export function parseRootPermission(text: string): RootPermission[] {
  const [action, apiId, extra] = text.split(":");
  if (extra !== undefined) throw new Error(`bad permission "${text}": use ACTION or ACTION:API_ID`);
  const actions = action === "*" ? (["read", "write", "verify", "usage"] as const) : [action];
  return actions.map((a) => {
    if (!["read", "write", "verify", "usage"].includes(a)) throw new Error(`bad permission "${text}": action must be read, write, verify, usage or *`);
    if (apiId !== undefined && !/^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$/.test(apiId)) throw new Error(`bad permission "${text}": invalid api id`);
    return { action: a as RootAction, apiId: apiId ?? null };
  });
}

export function formatRootPermission(p: RootPermission): string {
  return p.apiId === null ? p.action : `${p.action}:${p.apiId}`;
}
