/** Domain records, independent of protobuf and of any store. Times are epoch milliseconds. */

export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };
export type JsonObject = { [key: string]: JsonValue };

export interface Ratelimit {
  name: string;
  limit: number;
  durationMs: number;
  autoApply: boolean;
}

export type RefillInterval = "daily" | "monthly";

export interface Refill {
  interval: RefillInterval;
  amount: number;
  /** Day of month for monthly refills (1-31); null for daily. */
  refillDay: number | null;
  /** Start of the last period whose refill was applied (or creation time). */
  lastRefillAt: number;
}

/** A balance; a record without credits is unlimited. */
export interface Credits {
  remaining: number;
  refill: Refill | null;
}

export interface IdentityRecord {
  id: string;
  externalId: string;
  meta: JsonObject;
  ratelimits: Ratelimit[];
  credits: Credits | null;
  createdAt: number;
  updatedAt: number;
  /** Update counter, see KeyRecord.version. */
  version?: number;
}

export interface KeyRecord {
  id: string;
  apiId: string;
  identityId: string | null;
  /** Hex SHA-256 of the plaintext key. */
  hash: string;
  start: string;
  /** Random bytes of the secret, kept by a reroll; absent on records from before it was stored (16). */
  byteLength?: number;
  name: string;
  meta: JsonObject;
  enabled: boolean;
  expiresAt: number | null;
  credits: Credits | null;
  ratelimits: Ratelimit[];
  permissions: string[];
  createdAt: number;
  updatedAt: number;
  lastUsedAt: number | null;
  /**
   * Set on a key whose balance moved to another key by a reroll: its
   * verifications spend from that key's balance (`credits` then shows it), so
   * old and new key share one balance during the grace period.
   */
  creditsKeyId?: string | null;
  /**
   * The key whose rate-limit windows this key counts against: the first key of
   * a reroll chain, so old and new key share one set of windows. Absent: its own.
   */
  ratelimitKeyId?: string;
  /**
   * Update counter: raised by one, atomically with the write, by every store
   * write that records a change (absent on a record never updated: 0). A credit
   * spend does not raise it. The verification cache compares it so that a write
   * into the cache never replaces a newer record (docs/revocation.md).
   */
  version?: number;
}

export type RootAction = "read" | "write" | "verify" | "usage";
export const ROOT_ACTIONS: readonly RootAction[] = ["read", "write", "verify", "usage"];

/** One grant of a root key: an action, for every api or for one api. */
export interface RootPermission {
  action: RootAction;
  /** null: every api (and identities). */
  apiId: string | null;
}

export interface RootKeyRecord {
  id: string;
  name: string;
  hash: string;
  start: string;
  permissions: RootPermission[];
  createdAt: number;
}

export type IdentityPatch = Partial<Pick<IdentityRecord, "externalId" | "meta" | "ratelimits" | "credits">>;
export type KeyPatch = Partial<
  Pick<KeyRecord, "name" | "meta" | "enabled" | "expiresAt" | "credits" | "ratelimits" | "permissions" | "identityId">
>;

export type CreditsTarget = { keyId: string } | { identityId: string };
export type CreditsOp = { op: "set"; value: number | null } | { op: "increment"; value: number } | { op: "decrement"; value: number };
