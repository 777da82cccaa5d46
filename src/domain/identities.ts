import type { IdentityRepository } from "./ports/identities.js";
import type { Principal } from "./access.js";
import { InvalidArgumentError, NotFoundError } from "./errors.js";
import { ID_PATTERNS, newId } from "./ids.js";
import { decodePageToken, encodePageToken } from "./page-token.js";
import type { Credits, IdentityPatch, IdentityRecord, JsonObject, Ratelimit } from "./types.js";
import { LIMITS, checkCredits, checkExternalId, checkId, checkMeta, checkPageSize, checkRatelimits } from "./validation.js";

export interface CreateIdentityInput {
  externalId: string;
  meta: JsonObject;
  ratelimits: Ratelimit[];
  credits: Credits | null;
}

export type IdentityLookup = { id: string } | { externalId: string };

/** Identity use cases. Identities are global: every call needs a global permission. */
export function createIdentityManager(deps: { store: IdentityRepository; now?: () => number; afterWrite?: () => Promise<void> }) {
  const { store } = deps;
  const now = deps.now ?? Date.now;
  // Lets this instance's verification cache see the write before the RPC returns.
  const afterWrite = deps.afterWrite ?? (async () => undefined);

  async function find(lookup: IdentityLookup): Promise<IdentityRecord> {
    const rec =
      "id" in lookup
        ? await store.getIdentity(checkId("id", lookup.id, ID_PATTERNS.identity))
        : await store.getIdentityByExternalId(checkExternalId("external_id", lookup.externalId));
    if (!rec) throw new NotFoundError("identity not found");
    return rec;
  }

  return {
    find,

    async create(principal: Principal, input: CreateIdentityInput): Promise<IdentityRecord> {
      principal.requireForIdentities("write");
      const t = now();
      const rec: IdentityRecord = {
        id: newId("id", t),
        externalId: checkExternalId("external_id", input.externalId),
        meta: checkMeta("meta", input.meta),
        ratelimits: checkRatelimits("ratelimits", input.ratelimits),
        credits: checkCredits("credits", input.credits),
        createdAt: t,
        updatedAt: t,
      };
      await store.createIdentity(rec);
      return rec;
    },

    async get(principal: Principal, lookup: IdentityLookup): Promise<IdentityRecord> {
      principal.requireForIdentities("read");
      return find(lookup);
    },

    async list(principal: Principal, q: { pageSize: number; pageToken: string; search: string }) {
      principal.requireForIdentities("read");
      const limit = checkPageSize("page_size", q.pageSize);
      if (q.search.length > LIMITS.search) throw new InvalidArgumentError("search", `must be at most ${LIMITS.search} characters`);
      const query = { search: q.search };
      const afterId = decodePageToken("page_token", q.pageToken, query);
      const rows = await store.listIdentities({ limit: limit + 1, afterId }, q.search === "" ? null : q.search);
      const page = rows.slice(0, limit);
      const next = rows.length > limit ? encodePageToken(page[page.length - 1].id, query) : "";
      return { identities: page, nextPageToken: next };
    },

    /** `patch` holds only the fields named in the update mask, already converted. */
    async update(principal: Principal, id: string, patch: IdentityPatch): Promise<IdentityRecord> {
      principal.requireForIdentities("write");
      checkId("identity.id", id, ID_PATTERNS.identity);
      if (patch.externalId !== undefined) checkExternalId("identity.external_id", patch.externalId);
      if (patch.meta !== undefined) checkMeta("identity.meta", patch.meta);
      if (patch.ratelimits !== undefined) checkRatelimits("identity.ratelimits", patch.ratelimits);
      if (patch.credits !== undefined) checkCredits("identity.credits", patch.credits);
      const rec = await store.updateIdentity(id, patch, now());
      if (!rec) throw new NotFoundError("identity not found");
      await afterWrite();
      return rec;
    },

    async delete(principal: Principal, lookup: IdentityLookup, deleteKeys: boolean) {
      principal.requireForIdentities("write");
      const rec = await find(lookup);
      const res = await store.deleteIdentity(rec.id, deleteKeys);
      if (!res) throw new NotFoundError("identity not found");
      await afterWrite();
      return res;
    },
  };
}

export type IdentityManager = ReturnType<typeof createIdentityManager>;
