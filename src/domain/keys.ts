import type { CreditLedger } from "./ports/credit-ledger.js";
import type { IdentityRepository } from "./ports/identities.js";
import type { KeyRepository } from "./ports/keys.js";
import type { Principal } from "./access.js";
import { InvalidArgumentError, NotFoundError } from "./errors.js";
import { ID_PATTERNS, newId } from "./ids.js";
import { MIN_KEY_BYTES, generateKey } from "./key-format.js";
import { refillDueAt } from "./credits.js";
import { decodePageToken, encodePageToken } from "./page-token.js";
import type { Credits, CreditsOp, IdentityRecord, JsonObject, KeyPatch, KeyRecord, Ratelimit } from "./types.js";
import {
  LIMITS,
  checkAmount,
  checkApiId,
  checkByteLength,
  checkCredits,
  checkExternalId,
  checkId,
  checkKeyName,
  checkMeta,
  checkPageSize,
  checkPermissions,
  checkPrefix,
  checkRatelimits,
} from "./validation.js";

export type IdentityRef = { identityId: string } | { externalId: string } | null;

const LINKING = "linking a key to an identity (by identity_id or external_id), or unlinking it, changes what the identity's keys share";

export interface CreateKeyInput {
  apiId: string;
  prefix: string;
  byteLength: number;
  name: string;
  meta: JsonObject;
  expiresAt: number | null;
  enabled: boolean;
  credits: Credits | null;
  ratelimits: Ratelimit[];
  permissions: string[];
  identity: IdentityRef;
}

/** A key as returned to callers: the record plus its identity's external id. */
export type KeyView = KeyRecord & { externalId: string | null };

/** Key-management use cases (verification lives in verify.ts). */
export function createKeyManager(deps: { store: KeyRepository & IdentityRepository & Pick<CreditLedger, "updateCredits">; now?: () => number; afterWrite?: () => Promise<void> }) {
  const { store } = deps;
  const now = deps.now ?? Date.now;
  // Lets this instance's verification cache see the write before the RPC returns.
  const afterWrite = deps.afterWrite ?? (async () => undefined);

  async function view(k: KeyRecord): Promise<KeyView> {
    const identity = k.identityId ? await store.getIdentity(k.identityId) : null;
    return { ...k, externalId: identity?.externalId ?? null };
  }

  /** The key, if the caller may `action` it; otherwise NOT_FOUND (no existence leak). */
  async function visibleKey(principal: Principal, action: "read" | "write", field: string, id: string): Promise<KeyRecord> {
    if (!principal.hasAny(action)) principal.require(action, null);
    checkId(field, id, ID_PATTERNS.key);
    const k = await store.getKey(id);
    if (!k || !principal.can(action, k.apiId)) throw new NotFoundError("key not found");
    return k;
  }

  /** Resolves an identity reference, creating the identity for an unknown external id. */
  async function resolveIdentity(
    ref: IdentityRef,
    fields: { id: string; external: string },
  ): Promise<{ identity: IdentityRecord | null; created: boolean }> {
    if (ref === null) return { identity: null, created: false };
    if ("identityId" in ref) {
      checkId(fields.id, ref.identityId, ID_PATTERNS.identity);
      const identity = await store.getIdentity(ref.identityId);
      if (!identity) throw new NotFoundError(`${fields.id}: identity not found`);
      return { identity, created: false };
    }
    const t = now();
    return store.ensureIdentity({
      id: newId("id", t),
      externalId: checkExternalId(fields.external, ref.externalId),
      meta: {},
      ratelimits: [],
      credits: null,
      createdAt: t,
      updatedAt: t,
    });
  }

  return {
    view,

    async create(principal: Principal, input: CreateKeyInput): Promise<{ plaintext: string; key: KeyView }> {
      const apiId = checkApiId("api_id", input.apiId);
      principal.require("write", apiId);
      if (input.identity !== null) principal.requireForIdentities("write", LINKING);
      const t = now();
      // Validate everything before the first write.
      const prefix = checkPrefix("prefix", input.prefix);
      const byteLength = checkByteLength("byte_length", input.byteLength);
      const name = checkKeyName("name", input.name);
      const meta = checkMeta("meta", input.meta);
      const credits = checkCredits("credits", input.credits);
      const ratelimits = checkRatelimits("ratelimits", input.ratelimits);
      const permissions = checkPermissions("permissions", input.permissions);
      if (input.expiresAt !== null && input.expiresAt <= t) throw new InvalidArgumentError("expires_at", "must be in the future");
      if (input.identity && "externalId" in input.identity) checkExternalId("external_id", input.identity.externalId);

      const { identity, created } = await resolveIdentity(input.identity, { id: "identity_id", external: "external_id" });
      const secret = generateKey(prefix, byteLength);
      const rec: KeyRecord = {
        id: newId("key", t),
        apiId,
        identityId: identity?.id ?? null,
        hash: secret.hash,
        start: secret.start,
        byteLength,
        name,
        meta,
        enabled: input.enabled,
        expiresAt: input.expiresAt,
        credits,
        ratelimits,
        permissions,
        createdAt: t,
        updatedAt: t,
        lastUsedAt: null,
      };
      try {
        await store.createKey(rec);
      } catch (err) {
        // Nothing half-written: an identity created for this key goes with it.
        if (created && identity) await store.deleteIdentity(identity.id, false).catch(() => undefined);
        throw err;
      }
      await afterWrite();
      return { plaintext: secret.plaintext, key: { ...rec, externalId: identity?.externalId ?? null } };
    },

    async get(principal: Principal, id: string): Promise<KeyView> {
      return view(await visibleKey(principal, "read", "id", id));
    },

    async list(
      principal: Principal,
      q: { apiId: string; identityId: string; externalId: string; pageSize: number; pageToken: string },
    ): Promise<{ keys: KeyView[]; nextPageToken: string }> {
      const limit = checkPageSize("page_size", q.pageSize);
      if (q.apiId) checkApiId("api_id", q.apiId);
      if (q.identityId) checkId("identity_id", q.identityId, ID_PATTERNS.identity);
      if (q.externalId) checkExternalId("external_id", q.externalId);
      // A root key scoped to apis must say which api it lists.
      principal.require("read", q.apiId || null);
      const query = { a: q.apiId, i: q.identityId, e: q.externalId };
      const afterId = decodePageToken("page_token", q.pageToken, query);
      let identityId = q.identityId || undefined;
      let identities = new Map<string, IdentityRecord>();
      if (q.externalId) {
        const identity = await store.getIdentityByExternalId(q.externalId);
        if (!identity || (identityId !== undefined && identityId !== identity.id)) return { keys: [], nextPageToken: "" };
        identityId = identity.id;
        identities.set(identity.id, identity);
      }
      const rows = await store.listKeys({ apiId: q.apiId || undefined, identityId }, { limit: limit + 1, afterId });
      const page = rows.slice(0, limit);
      const missing = [...new Set(page.map((k) => k.identityId).filter((id): id is string => !!id && !identities.has(id)))];
      for (const i of await store.getIdentities(missing)) identities.set(i.id, i);
      return {
        keys: page.map((k) => ({ ...k, externalId: k.identityId ? (identities.get(k.identityId)?.externalId ?? null) : null })),
        nextPageToken: rows.length > limit ? encodePageToken(page[page.length - 1].id, query) : "",
      };
    },

    /**
     * `patch` holds only the fields named in the update mask. `identity` is
     * set when the mask names identity_id or external_id (null detaches).
     */
    async update(principal: Principal, id: string, patch: KeyPatch, identity: IdentityRef | undefined): Promise<KeyView> {
      // Before the key is even read: attaching, moving and detaching are all identity changes.
      if (identity !== undefined) principal.requireForIdentities("write", LINKING);
      const cur = await visibleKey(principal, "write", "key.id", id);
      if (patch.name !== undefined) checkKeyName("key.name", patch.name);
      if (patch.meta !== undefined) checkMeta("key.meta", patch.meta);
      if (patch.credits !== undefined) checkCredits("key.credits", patch.credits);
      if (patch.ratelimits !== undefined) checkRatelimits("key.ratelimits", patch.ratelimits);
      if (patch.permissions !== undefined) patch.permissions = checkPermissions("key.permissions", patch.permissions);
      if (identity && "externalId" in identity) checkExternalId("key.external_id", identity.externalId);
      let created: IdentityRecord | null = null;
      if (identity !== undefined) {
        const res = await resolveIdentity(identity, { id: "key.identity_id", external: "key.external_id" });
        patch.identityId = res.identity?.id ?? null;
        if (res.created) created = res.identity;
      }
      try {
        const rec = await store.updateKey(cur.id, patch, now());
        if (!rec) throw new NotFoundError("key not found");
        await afterWrite();
        return await view(rec);
      } catch (err) {
        if (created) await store.deleteIdentity(created.id, false).catch(() => undefined);
        throw err;
      }
    },

    async delete(principal: Principal, id: string): Promise<void> {
      const k = await visibleKey(principal, "write", "id", id);
      if (!(await store.deleteKey(k.id))) throw new NotFoundError("key not found");
      await afterWrite();
    },

    async reroll(principal: Principal, id: string, graceMs: number): Promise<{ plaintext: string; key: KeyView; oldExpiresAt: number }> {
      if (!Number.isInteger(graceMs) || graceMs < 0 || graceMs > LIMITS.maxGraceMs) {
        throw new InvalidArgumentError("grace_period", "must be between 0 and 30 days");
      }
      const old = await visibleKey(principal, "write", "id", id);
      const t = now();
      const prefixEnd = old.start.lastIndexOf("_");
      const prefix = prefixEnd >= 0 ? old.start.slice(0, prefixEnd) : "";
      const secret = generateKey(prefix, old.byteLength ?? MIN_KEY_BYTES);
      const next: KeyRecord = {
        ...old,
        id: newId("key", t),
        hash: secret.hash,
        start: secret.start,
        createdAt: t,
        updatedAt: t,
        lastUsedAt: null,
        // One set of windows for the whole reroll chain; the balance moves in the store.
        ratelimitKeyId: old.ratelimitKeyId ?? old.id,
      };
      const oldExpiresAt = old.expiresAt === null ? t + graceMs : Math.min(old.expiresAt, t + graceMs);
      const stored = await store.rerollKey(old.id, next, oldExpiresAt, t);
      if (!stored) throw new NotFoundError("key not found");
      await afterWrite();
      return { plaintext: secret.plaintext, key: await view(stored), oldExpiresAt };
    },

    async updateCredits(
      principal: Principal,
      target: { keyId: string } | { identityId: string },
      op: CreditsOp,
    ): Promise<Credits | null> {
      if (op.value !== null) checkAmount("value", op.value);
      // The due refill first, then the operation (domain/credits.ts): the store
      // applies both atomically, against the balance it holds.
      let current: Credits | null;
      if ("keyId" in target) {
        current = (await visibleKey(principal, "write", "key_id", target.keyId)).credits;
      } else {
        principal.requireForIdentities("write");
        checkId("identity_id", target.identityId, ID_PATTERNS.identity);
        const identity = await store.getIdentity(target.identityId);
        if (!identity) throw new NotFoundError("identity not found");
        current = identity.credits;
      }
      const t = now();
      const res = await store.updateCredits(target, op, t, refillDueAt(current, t));
      if (res === undefined) throw new NotFoundError("keyId" in target ? "key not found" : "identity not found");
      await afterWrite();
      return res;
    },
  };
}

export type KeyManager = ReturnType<typeof createKeyManager>;
