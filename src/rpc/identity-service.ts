import type { ServiceImpl } from "@connectrpc/connect";
import { IdentityService } from "../../gen/latchkey/v1/identity_service_pb.js";
import type { IdentityLookup, IdentityManager } from "../domain/identities.js";
import { InvalidArgumentError } from "../domain/errors.js";
import type { IdentityPatch } from "../domain/types.js";
import type { UsageReader } from "../domain/usage-reader.js";
import { principalOf } from "./context.js";
import { usageReportToProto, usageRequestOf } from "./usage-convert.js";
import { withWellFormedRequests } from "./well-formed.js";
import { identityToProto, maskPaths, toCredits, toMeta, toRatelimits } from "./convert.js";

const UPDATE_PATHS = ["external_id", "meta", "ratelimits", "credits"] as const;

function lookupOf(l: { case: "id" | "externalId"; value: string } | { case: undefined; value?: undefined }): IdentityLookup {
  if (l.case === "id") return { id: l.value };
  if (l.case === "externalId") return { externalId: l.value };
  throw new InvalidArgumentError("id", "one of id or external_id is required");
}

/** IdentityService: translates protobuf to domain calls and back. */
export function createIdentityService(deps: {
  identities: IdentityManager;
  usage: UsageReader;
  now?: () => number;
}): ServiceImpl<typeof IdentityService> {
  const { identities, usage } = deps;
  const now = deps.now ?? Date.now;
  return withWellFormedRequests(IdentityService, {
    async createIdentity(req, ctx) {
      const identity = await identities.create(principalOf(ctx), {
        externalId: req.externalId,
        meta: toMeta(req.meta),
        ratelimits: toRatelimits("ratelimits", req.ratelimits),
        credits: toCredits("credits", req.credits, now()),
      });
      return { identity: identityToProto(identity) };
    },

    async getIdentity(req, ctx) {
      return { identity: identityToProto(await identities.get(principalOf(ctx), lookupOf(req.lookup))) };
    },

    async listIdentities(req, ctx) {
      const res = await identities.list(principalOf(ctx), { pageSize: req.pageSize, pageToken: req.pageToken, search: req.search });
      return { identities: res.identities.map(identityToProto), nextPageToken: res.nextPageToken };
    },

    async updateIdentity(req, ctx) {
      const paths = maskPaths(req.updateMask?.paths, UPDATE_PATHS);
      const src = req.identity;
      if (!src) throw new InvalidArgumentError("identity", "is required");
      const patch: IdentityPatch = {};
      if (paths.has("external_id")) patch.externalId = src.externalId;
      if (paths.has("meta")) patch.meta = toMeta(src.meta);
      if (paths.has("ratelimits")) patch.ratelimits = toRatelimits("identity.ratelimits", src.ratelimits);
      if (paths.has("credits")) patch.credits = toCredits("identity.credits", src.credits, now());
      return { identity: identityToProto(await identities.update(principalOf(ctx), src.id, patch)) };
    },

    async deleteIdentity(req, ctx) {
      const res = await identities.delete(principalOf(ctx), lookupOf(req.lookup), req.deleteKeys);
      return { deletedKeys: BigInt(res.deletedKeys), unlinkedKeys: BigInt(res.unlinkedKeys) };
    },

    async getIdentityUsage(req, ctx) {
      return usageReportToProto(await usage.identityUsage(principalOf(ctx), lookupOf(req.lookup), usageRequestOf(req)));
    },
  } satisfies ServiceImpl<typeof IdentityService>);
}
