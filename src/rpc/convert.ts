import { create } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromMs, timestampMs, type Duration, type Timestamp } from "@bufbuild/protobuf/wkt";
import {
  CreditsSchema,
  RatelimitSchema,
  RefillInterval,
  type Credits as PbCredits,
  type Ratelimit as PbRatelimit,
} from "../../gen/latchkey/v1/common_pb.js";
import { IdentitySchema, type Identity } from "../../gen/latchkey/v1/identity_pb.js";
import { KeySchema, type Key } from "../../gen/latchkey/v1/key_pb.js";
import { InvalidArgumentError } from "../domain/errors.js";
import type { KeyView } from "../domain/keys.js";
import type { Credits, IdentityRecord, JsonObject, Ratelimit } from "../domain/types.js";

/* Translation between protobuf messages and domain records, and nothing else. */

/** An int64 as a JavaScript number, refusing values past 2^53. */
export function toNumber(field: string, v: bigint): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER) || v < BigInt(Number.MIN_SAFE_INTEGER)) {
    throw new InvalidArgumentError(field, "is out of range");
  }
  return Number(v);
}

export function toMs(field: string, t: Timestamp | undefined): number | null {
  if (!t) return null;
  const ms = timestampMs(t);
  // Timestamps are valid from year 0001 to 9999 (the protobuf range).
  if (!Number.isFinite(ms) || ms < -62135596800000 || ms > 253402300799999 || t.nanos < 0 || t.nanos > 999_999_999) {
    throw new InvalidArgumentError(field, "is not a valid timestamp");
  }
  return ms;
}

export function durationToMs(field: string, d: Duration | undefined): number {
  if (!d) return 0;
  if (d.nanos < -999_999_999 || d.nanos > 999_999_999) throw new InvalidArgumentError(field, "is not a valid duration");
  return toNumber(field, d.seconds) * 1000 + d.nanos / 1e6;
}

export const ms = (v: number | null): Timestamp | undefined => (v === null ? undefined : timestampFromMs(v));

export function toRatelimits(field: string, list: PbRatelimit[]): Ratelimit[] {
  return list.map((r, i) => ({
    name: r.name,
    limit: toNumber(`${field}[${i}].limit`, r.limit),
    durationMs: durationToMs(`${field}[${i}].duration`, r.duration),
    autoApply: r.autoApply,
  }));
}

export function toCredits(field: string, c: PbCredits | undefined, now: number): Credits | null {
  if (!c) return null;
  const remaining = toNumber(`${field}.remaining`, c.remaining);
  if (!c.refill) return { remaining, refill: null };
  const interval =
    c.refill.interval === RefillInterval.DAILY ? "daily" : c.refill.interval === RefillInterval.MONTHLY ? "monthly" : null;
  if (!interval) throw new InvalidArgumentError(`${field}.refill.interval`, "must be DAILY or MONTHLY");
  return {
    remaining,
    refill: {
      interval,
      amount: toNumber(`${field}.refill.amount`, c.refill.amount),
      refillDay: interval === "daily" ? (c.refill.refillDay === 0 ? null : c.refill.refillDay) : c.refill.refillDay || 1,
      lastRefillAt: now,
    },
  };
}

export function toMeta(m: JsonObject | undefined): JsonObject {
  return m ?? {};
}

export function ratelimitsToProto(list: Ratelimit[]): PbRatelimit[] {
  return list.map((r) =>
    create(RatelimitSchema, { name: r.name, limit: BigInt(r.limit), duration: durationFromMs(r.durationMs), autoApply: r.autoApply }),
  );
}

export function creditsToProto(c: Credits | null): PbCredits | undefined {
  if (!c) return undefined;
  return create(CreditsSchema, {
    remaining: BigInt(c.remaining),
    refill: c.refill
      ? {
          interval: c.refill.interval === "daily" ? RefillInterval.DAILY : RefillInterval.MONTHLY,
          amount: BigInt(c.refill.amount),
          refillDay: c.refill.refillDay ?? 0,
          lastRefillAt: timestampFromMs(c.refill.lastRefillAt),
        }
      : undefined,
  });
}

export function identityToProto(r: IdentityRecord): Identity {
  return create(IdentitySchema, {
    id: r.id,
    externalId: r.externalId,
    meta: r.meta,
    ratelimits: ratelimitsToProto(r.ratelimits),
    credits: creditsToProto(r.credits),
    createdAt: timestampFromMs(r.createdAt),
    updatedAt: timestampFromMs(r.updatedAt),
  });
}

export function keyToProto(k: KeyView): Key {
  return create(KeySchema, {
    id: k.id,
    apiId: k.apiId,
    identityId: k.identityId ?? "",
    externalId: k.externalId ?? "",
    name: k.name,
    meta: k.meta,
    start: k.start,
    enabled: k.enabled,
    expiresAt: ms(k.expiresAt),
    credits: creditsToProto(k.credits),
    ratelimits: ratelimitsToProto(k.ratelimits),
    permissions: k.permissions,
    createdAt: timestampFromMs(k.createdAt),
    updatedAt: timestampFromMs(k.updatedAt),
    lastUsedAt: ms(k.lastUsedAt),
  });
}

/** The paths of an update mask, checked against the allowed ones. */
export function maskPaths(paths: string[] | undefined, allowed: readonly string[]): Set<string> {
  if (!paths || paths.length === 0) {
    throw new InvalidArgumentError("update_mask", `is required; allowed paths: ${allowed.join(", ")}`);
  }
  for (const p of paths) {
    if (!allowed.includes(p)) throw new InvalidArgumentError("update_mask", `unknown path "${p}"; allowed paths: ${allowed.join(", ")}`);
  }
  return new Set(paths);
}
