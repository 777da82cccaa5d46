import { InvalidArgumentError } from "./errors.js";
import { MAX_KEY_BYTES, MIN_KEY_BYTES } from "./key-format.js";
import type { Credits, JsonObject, JsonValue, Ratelimit, RootAction } from "./types.js";
import { ROOT_ACTIONS } from "./types.js";

/**
 * The limits on input (README "Limits on input"). Every check throws
 * InvalidArgumentError naming the request field, before anything is written.
 */
export const LIMITS = {
  externalId: /^[A-Za-z0-9_.:|@+\-]{1,255}$/,
  apiId: /^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$/,
  prefix: /^[A-Za-z][A-Za-z0-9]{0,15}$/,
  name: /^[A-Za-z0-9_.:\-]{1,128}$/,
  permission: /^[A-Za-z0-9_.:*/\-]{1,128}$/,
  tag: 128,
  maxTags: 10,
  keyName: 255,
  metaProperties: 100,
  metaBytes: 64 * 1024,
  metaDepth: 32,
  ratelimits: 50,
  permissions: 100,
  pageSize: 100,
  defaultPageSize: 50,
  search: 255,
  maxDurationMs: 30 * 24 * 3600 * 1000,
  maxCredits: Number.MAX_SAFE_INTEGER,
  maxGraceMs: 30 * 24 * 3600 * 1000,
} as const;

export function checkExternalId(field: string, v: string): string {
  if (!LIMITS.externalId.test(v)) {
    throw new InvalidArgumentError(field, "must be 1-255 characters of letters, digits and _ . : | @ + -");
  }
  return v;
}

export function checkApiId(field: string, v: string): string {
  if (!LIMITS.apiId.test(v)) {
    throw new InvalidArgumentError(field, "must match [A-Za-z0-9][A-Za-z0-9_.-]{0,63}");
  }
  return v;
}

export function checkId(field: string, v: string, pattern: RegExp): string {
  if (!pattern.test(v)) throw new InvalidArgumentError(field, "is not a valid id");
  return v;
}

export function checkPrefix(field: string, v: string): string {
  if (v !== "" && !LIMITS.prefix.test(v)) {
    throw new InvalidArgumentError(field, "must be 1-16 letters and digits, starting with a letter");
  }
  return v;
}

export function checkByteLength(field: string, v: number): number {
  const n = v === 0 ? MIN_KEY_BYTES : v;
  if (!Number.isInteger(n) || n < MIN_KEY_BYTES || n > MAX_KEY_BYTES) {
    throw new InvalidArgumentError(field, `must be between ${MIN_KEY_BYTES} and ${MAX_KEY_BYTES}`);
  }
  return n;
}

export function checkKeyName(field: string, v: string): string {
  if (v.length > LIMITS.keyName) throw new InvalidArgumentError(field, `must be at most ${LIMITS.keyName} characters`);
  if (/[\u0000-\u001f]/.test(v)) throw new InvalidArgumentError(field, "must not contain control characters");
  return v;
}

function depth(v: JsonValue, d: number): number {
  if (d > LIMITS.metaDepth) return d;
  if (Array.isArray(v)) return v.reduce<number>((m, x) => Math.max(m, depth(x, d + 1)), d);
  if (v !== null && typeof v === "object") return Object.values(v).reduce<number>((m, x) => Math.max(m, depth(x, d + 1)), d);
  return d;
}

/** meta: a JSON object of at most 100 top-level properties, 64 KiB as JSON and 32 levels. */
export function checkMeta(field: string, v: JsonObject): JsonObject {
  if (v === null || typeof v !== "object" || Array.isArray(v)) throw new InvalidArgumentError(field, "must be a JSON object");
  if (Object.keys(v).length > LIMITS.metaProperties) {
    throw new InvalidArgumentError(field, `must have at most ${LIMITS.metaProperties} top-level properties`);
  }
  if (Buffer.byteLength(JSON.stringify(v)) > LIMITS.metaBytes) {
    throw new InvalidArgumentError(field, `must be at most ${LIMITS.metaBytes} bytes as JSON`);
  }
  if (depth(v, 0) > LIMITS.metaDepth) throw new InvalidArgumentError(field, `must nest at most ${LIMITS.metaDepth} levels`);
  return v;
}

export function checkRatelimits(field: string, list: Ratelimit[]): Ratelimit[] {
  if (list.length > LIMITS.ratelimits) throw new InvalidArgumentError(field, `must have at most ${LIMITS.ratelimits} entries`);
  const seen = new Set<string>();
  list.forEach((r, i) => {
    const f = `${field}[${i}]`;
    if (!LIMITS.name.test(r.name)) throw new InvalidArgumentError(`${f}.name`, "must be 1-128 characters of letters, digits and _ . : -");
    if (seen.has(r.name)) throw new InvalidArgumentError(`${f}.name`, `duplicate name "${r.name}"`);
    seen.add(r.name);
    if (!Number.isSafeInteger(r.limit) || r.limit < 1) throw new InvalidArgumentError(`${f}.limit`, "must be at least 1");
    // Whole seconds: the Redis counter keeps windows in seconds, and every backend must agree.
    if (!Number.isInteger(r.durationMs) || r.durationMs % 1000 !== 0 || r.durationMs < 1000 || r.durationMs > LIMITS.maxDurationMs) {
      throw new InvalidArgumentError(`${f}.duration`, "must be whole seconds, between 1s and 30 days");
    }
  });
  return list;
}

export function checkPermissions(field: string, list: string[]): string[] {
  if (list.length > LIMITS.permissions) throw new InvalidArgumentError(field, `must have at most ${LIMITS.permissions} entries`);
  list.forEach((p, i) => {
    if (!LIMITS.permission.test(p)) {
      throw new InvalidArgumentError(`${field}[${i}]`, "must be 1-128 characters of letters, digits and _ . : * / -");
    }
  });
  return [...new Set(list)];
}

export function checkCredits(field: string, c: Credits | null): Credits | null {
  if (c === null) return null;
  if (!Number.isSafeInteger(c.remaining) || c.remaining < 0) throw new InvalidArgumentError(`${field}.remaining`, "must be at least 0");
  if (c.refill) {
    const r = c.refill;
    if (!Number.isSafeInteger(r.amount) || r.amount < 0) throw new InvalidArgumentError(`${field}.refill.amount`, "must be at least 0");
    if (r.interval === "daily" && r.refillDay !== null) {
      throw new InvalidArgumentError(`${field}.refill.refill_day`, "must be 0 for daily refills");
    }
    if (r.interval === "monthly" && (r.refillDay === null || r.refillDay < 1 || r.refillDay > 31)) {
      throw new InvalidArgumentError(`${field}.refill.refill_day`, "must be between 1 and 31");
    }
  }
  return c;
}

export function checkAmount(field: string, v: number): number {
  if (!Number.isSafeInteger(v) || v < 0) throw new InvalidArgumentError(field, "must be a whole number of at least 0");
  return v;
}

export function checkPageSize(field: string, v: number): number {
  if (v < 0 || v > LIMITS.pageSize) throw new InvalidArgumentError(field, `must be between 0 and ${LIMITS.pageSize}`);
  return v === 0 ? LIMITS.defaultPageSize : v;
}

export function checkRootAction(field: string, v: string): RootAction {
  if (!(ROOT_ACTIONS as readonly string[]).includes(v)) {
    throw new InvalidArgumentError(field, `must be one of ${ROOT_ACTIONS.join(", ")}`);
  }
  return v as RootAction;
}
