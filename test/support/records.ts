import { newId } from "../../src/domain/ids.js";
import { generateKey } from "../../src/domain/key-format.js";
import type { IdentityRecord, KeyRecord } from "../../src/domain/types.js";
import { unique } from "./harness.js";

/** A stored identity as the store takes it: no credits, no limits, a unique external_id; `over` wins. */
export function identityRecord(over: Partial<IdentityRecord> = {}, at = Date.now()): IdentityRecord {
  return { id: newId("id", at), externalId: unique("ext"), meta: {}, ratelimits: [], credits: null, createdAt: at, updatedAt: at, ...over };
}

/** A stored key (a real "sk_" key, enabled, no identity, limits or credits) and its plaintext; `over` wins. */
export function keyRecord(over: Partial<KeyRecord> = {}, at = Date.now()): { record: KeyRecord; plaintext: string } {
  const secret = generateKey("sk", 16);
  const record: KeyRecord = {
    id: newId("key", at),
    apiId: unique("api"),
    identityId: null,
    hash: secret.hash,
    start: secret.start,
    name: "",
    meta: {},
    enabled: true,
    expiresAt: null,
    credits: null,
    ratelimits: [],
    permissions: [],
    createdAt: at,
    updatedAt: at,
    lastUsedAt: null,
    ...over,
  };
  return { record, plaintext: secret.plaintext };
}
