import type { HandlerContext, ServiceImpl } from "@connectrpc/connect";
import { CreditsOperation, KeyService } from "../../gen/latchkey/v1/key_service_pb.js";
import { VerificationCode } from "../../gen/latchkey/v1/usage_pb.js";
import type { Verification, Verifier, VerifyInput } from "../domain/verify.js";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { VerifyKeyResponseSchema } from "../../gen/latchkey/v1/key_service_pb.js";
import { InvalidArgumentError } from "../domain/errors.js";
import type { IdentityRef, KeyManager } from "../domain/keys.js";
import type { CreditsOp, KeyPatch } from "../domain/types.js";
import type { UsageReader } from "../domain/usage-reader.js";
import { MAX_KEY_LENGTH } from "../domain/key-format.js";
import { callSignalKey, principalOf } from "./context.js";
import { grpcTimeoutUnitMs } from "./grpc-timeout.js";
import { usageReportToProto, usageRequestOf } from "./usage-convert.js";
import { withWellFormedRequests } from "./well-formed.js";
import { creditsToProto, durationToMs, keyToProto, maskPaths, ms, toCredits, toMeta, toMs, toNumber, toRatelimits } from "./convert.js";

const UPDATE_PATHS = [
  "name",
  "meta",
  "enabled",
  "expires_at",
  "credits",
  "ratelimits",
  "permissions",
  "identity_id",
  "external_id",
] as const;

const CODES: Record<Verification["code"], VerificationCode> = {
  VALID: VerificationCode.VALID,
  NOT_FOUND: VerificationCode.NOT_FOUND,
  DISABLED: VerificationCode.DISABLED,
  EXPIRED: VerificationCode.EXPIRED,
  INSUFFICIENT_PERMISSIONS: VerificationCode.INSUFFICIENT_PERMISSIONS,
  RATE_LIMITED: VerificationCode.RATE_LIMITED,
  USAGE_EXCEEDED: VerificationCode.USAGE_EXCEEDED,
};

const NO_RATELIMITS: VerifyInput["ratelimits"] = Object.freeze([]) as unknown as VerifyInput["ratelimits"];

/** A Timestamp as a plain init object: `timestampFromMs` builds a message through `create`, per rate limit and call. */
const timestampInit = (ms: number) => {
  const seconds = Math.floor(ms / 1000);
  return { seconds: BigInt(seconds), nanos: (ms - seconds * 1000) * 1_000_000 };
};

/** The response of a verification: key data only for a found key. */
export function verificationToProto(v: Verification): MessageInitShape<typeof VerifyKeyResponseSchema> {
  const k = v.key;
  if (!k || v.code === "NOT_FOUND") return { valid: false, code: VerificationCode.NOT_FOUND };
  return {
    valid: v.code === "VALID",
    code: CODES[v.code],
    keyId: k.id,
    apiId: k.apiId,
    name: k.name,
    meta: k.meta,
    expiresAt: ms(k.expiresAt),
    enabled: k.enabled,
    creditsRemaining: v.creditsRemaining === null ? undefined : BigInt(v.creditsRemaining),
    permissions: k.permissions,
    identity: v.identity ? { id: v.identity.id, externalId: v.identity.externalId, meta: v.identity.meta } : undefined,
    ratelimits: v.ratelimits.map((r) => ({
      name: r.name,
      limit: BigInt(r.limit),
      remaining: BigInt(r.remaining),
      resetAt: timestampInit(r.resetAt),
      exceeded: r.exceeded,
    })),
  };
}

/**
 * What is surely left of the call's deadline, for the verification's commit
 * point: a gRPC client rounds its timeout UP to the header's unit (grpcio sends
 * "1m" for 0.5 ms), so the deadline may be up to one unit earlier than the
 * header says.
 */
function commitTimeoutMs(ctx: HandlerContext): number | undefined {
  const timeoutMs = ctx.timeoutMs();
  if (timeoutMs === undefined) return undefined;
  const unit = grpcTimeoutUnitMs(ctx.requestHeader.get("grpc-timeout") ?? "");
  return unit === undefined ? timeoutMs : Math.max(0, timeoutMs - unit);
}

/** KeyService: translates protobuf to domain calls and back. */
export function createKeyService(deps: {
  keys: KeyManager;
  verify: Verifier;
  usage: UsageReader;
  now?: () => number;
}): ServiceImpl<typeof KeyService> {
  const { keys, verify, usage } = deps;
  const now = deps.now ?? Date.now;
  return withWellFormedRequests(KeyService, {
    async createKey(req, ctx) {
      const identity: IdentityRef =
        req.identity.case === "identityId"
          ? { identityId: req.identity.value }
          : req.identity.case === "externalId"
            ? { externalId: req.identity.value }
            : null;
      const res = await keys.create(principalOf(ctx), {
        apiId: req.apiId,
        prefix: req.prefix,
        byteLength: req.byteLength,
        name: req.name,
        meta: toMeta(req.meta),
        expiresAt: toMs("expires_at", req.expiresAt),
        enabled: req.enabled ?? true,
        credits: toCredits("credits", req.credits, now()),
        ratelimits: toRatelimits("ratelimits", req.ratelimits),
        permissions: req.permissions,
        identity,
      });
      return { plaintext: res.plaintext, key: keyToProto(res.key) };
    },

    async getKey(req, ctx) {
      return { key: keyToProto(await keys.get(principalOf(ctx), req.id)) };
    },

    async listKeys(req, ctx) {
      const res = await keys.list(principalOf(ctx), {
        apiId: req.apiId,
        identityId: req.identityId,
        externalId: req.externalId,
        pageSize: req.pageSize,
        pageToken: req.pageToken,
      });
      return { keys: res.keys.map(keyToProto), nextPageToken: res.nextPageToken };
    },

    async updateKey(req, ctx) {
      const paths = maskPaths(req.updateMask?.paths, UPDATE_PATHS);
      const src = req.key;
      if (!src) throw new InvalidArgumentError("key", "is required");
      if (paths.has("identity_id") && paths.has("external_id")) {
        throw new InvalidArgumentError("update_mask", "name identity_id or external_id, not both");
      }
      const patch: KeyPatch = {};
      if (paths.has("name")) patch.name = src.name;
      if (paths.has("meta")) patch.meta = toMeta(src.meta);
      if (paths.has("enabled")) patch.enabled = src.enabled;
      if (paths.has("expires_at")) patch.expiresAt = toMs("key.expires_at", src.expiresAt);
      if (paths.has("credits")) patch.credits = toCredits("key.credits", src.credits, now());
      if (paths.has("ratelimits")) patch.ratelimits = toRatelimits("key.ratelimits", src.ratelimits);
      if (paths.has("permissions")) patch.permissions = src.permissions;
      let identity: IdentityRef | undefined;
      if (paths.has("identity_id")) identity = src.identityId ? { identityId: src.identityId } : null;
      if (paths.has("external_id")) identity = src.externalId ? { externalId: src.externalId } : null;
      return { key: keyToProto(await keys.update(principalOf(ctx), src.id, patch, identity)) };
    },

    async deleteKey(req, ctx) {
      await keys.delete(principalOf(ctx), req.id);
      return {};
    },

    async rerollKey(req, ctx) {
      const res = await keys.reroll(principalOf(ctx), req.id, durationToMs("grace_period", req.gracePeriod));
      return { plaintext: res.plaintext, key: keyToProto(res.key), oldKeyExpiresAt: ms(res.oldExpiresAt) };
    },

    async updateCredits(req, ctx) {
      const target =
        req.target.case === "keyId"
          ? { keyId: req.target.value }
          : req.target.case === "identityId"
            ? { identityId: req.target.value }
            : null;
      if (!target) throw new InvalidArgumentError("key_id", "one of key_id or identity_id is required");
      const value = req.value === undefined ? null : toNumber("value", req.value);
      let op: CreditsOp;
      switch (req.operation) {
        case CreditsOperation.SET:
          op = { op: "set", value };
          break;
        case CreditsOperation.INCREMENT:
        case CreditsOperation.DECREMENT:
          if (value === null) throw new InvalidArgumentError("value", "is required for INCREMENT and DECREMENT");
          op = { op: req.operation === CreditsOperation.INCREMENT ? "increment" : "decrement", value };
          break;
        default:
          throw new InvalidArgumentError("operation", "must be SET, INCREMENT or DECREMENT");
      }
      const credits = await keys.updateCredits(principalOf(ctx), target, op);
      return { credits: creditsToProto(credits) };
    },

    async verifyKey(req, ctx): Promise<MessageInitShape<typeof VerifyKeyResponseSchema>> {
      // Before any hashing or lookup: no key is that long.
      if (req.key.length > MAX_KEY_LENGTH) throw new InvalidArgumentError("key", `must be at most ${MAX_KEY_LENGTH} characters`);
      const v = await verify(principalOf(ctx), {
        key: req.key,
        apiId: req.apiId,
        permissions: req.permissions,
        ratelimits: req.ratelimits.length === 0 ? NO_RATELIMITS : req.ratelimits.map((r, i) => ({
          name: r.name,
          cost: r.cost === undefined ? null : toNumber(`ratelimits[${i}].cost`, r.cost),
        })),
        cost: req.cost === undefined ? null : toNumber("cost", req.cost),
        tags: req.tags,
      }, { signal: ctx.values.get(callSignalKey) ?? ctx.signal, timeoutMs: commitTimeoutMs(ctx) });
      return verificationToProto(v);
    },

    async getKeyUsage(req, ctx) {
      return usageReportToProto(await usage.keyUsage(principalOf(ctx), req.id, usageRequestOf(req)));
    },
  } satisfies ServiceImpl<typeof KeyService>);
}
