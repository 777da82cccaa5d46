import { execFileSync } from "node:child_process";
/**
 * Helpers for the VerifyKey behaviour tests: request shorthands over the
 * in-process harness (../support/harness.ts), a store wrapper that counts
 * calls, backend gating (MongoDB, Redis: skipped locally when not configured,
 * failing in CI), and two real server processes on one MongoDB database.
 */
import type { MessageInitShape } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { describe, it } from "vitest";
import type { RatelimitSchema } from "../../gen/latchkey/v1/common_pb.js";
import type { CreateIdentityRequestSchema } from "../../gen/latchkey/v1/identity_service_pb.js";
import type { CreateKeyRequestSchema, VerifyKeyResponse } from "../../gen/latchkey/v1/key_service_pb.js";
import { VerificationCode } from "../../gen/latchkey/v1/usage_pb.js";
import type { Store } from "../../src/storage/store.js";
import type { Clients, StoreKind } from "../support/harness.js";
import { credits as protoCredits } from "../support/proto.js";

export const IN_CI = !!process.env.CI;

/** The Redis URL the counter tests use (REDIS_URL), or null. */
export function redisUrl(): string | null {
  return process.env.REDIS_URL || null;
}

/** The MongoDB URI (MONGODB_URI), or null. */
export function mongodbUri(): string | null {
  return process.env.MONGODB_URI || null;
}

/**
 * A describe block that needs an external service. Without its setting it is
 * skipped locally, and fails in CI (CI is set), so CI never silently skips it.
 */
export function describeWith(setting: string, value: string | null, name: string, fn: () => void): void {
  if (value) {
    describe(name, fn);
  } else if (IN_CI) {
    describe(name, () => {
      it(`has ${setting} set in CI`, () => {
        throw new Error(`${setting} is not set, but CI is: "${name}" must run in CI`);
      });
    });
  } else {
    describe.skip(`${name} (needs ${setting})`, fn);
  }
}

/** `describe` once per store kind: embedded always, mongodb when MONGODB_URI is set (required in CI). */
export function describeEachStore(name: string, fn: (kind: StoreKind) => void): void {
  describe(`${name} (embedded store)`, () => fn("embedded"));
  describeWith("MONGODB_URI", mongodbUri(), `${name} (mongodb store)`, () => fn("mongodb"));
}

/** The verification code's short name ("VALID", "NOT_FOUND", ...). */
export function codeName(code: VerificationCode): string {
  return VerificationCode[code];
}

/** A VerifyKey request without its key. */
export interface VerifyInit {
  apiId?: string;
  permissions?: string;
  ratelimits?: { name: string; cost?: bigint }[];
  cost?: bigint;
  tags?: string[];
}

/** Verifies `key` and returns the answer with its code as a name, for readable assertions. */
export async function verify(c: Clients, key: string, req: VerifyInit = {}): Promise<VerifyKeyResponse & { codeName: string }> {
  const res = await c.keys.verifyKey({ key, ...req });
  return Object.assign(res, { codeName: codeName(res.code) });
}

/** `n` verifications at once; the code names, in call order. */
export async function verifyConcurrently(c: Clients, keys: string[], n: number, req: VerifyInit = {}): Promise<string[]> {
  const all = await Promise.all(Array.from({ length: n }, (_, i) => verify(c, keys[i % keys.length], req)));
  return all.map((r) => r.codeName);
}

export function count(codes: string[], code: string): number {
  return codes.filter((c) => c === code).length;
}

/** A rate limit as the API takes it. */
export function limit(name: string, max: number, durationMs: number, autoApply = true): MessageInitShape<typeof RatelimitSchema> {
  return { name, limit: BigInt(max), duration: durationFromMs(durationMs), autoApply };
}

export const MINUTE = 60_000;

/** Credits as the API takes them (the shared helper, with the refill day named as in the API). */
export function credits(remaining: number, refill?: { interval: "daily" | "monthly"; amount: number; refillDay?: number }) {
  return protoCredits(remaining, refill && { interval: refill.interval, amount: refill.amount, day: refill.refillDay });
}

export type CreateKeyInit = MessageInitShape<typeof CreateKeyRequestSchema>;

/** Creates a key (api "api_verify" unless given) and returns its plaintext and id. */
export async function createKey(c: Clients, req: Partial<CreateKeyInit> = {}): Promise<{ plaintext: string; id: string }> {
  const res = await c.keys.createKey({ apiId: "api_verify", ...req } as CreateKeyInit);
  return { plaintext: res.plaintext, id: res.key!.id };
}

/** Creates an identity and `n` keys linked to it. */
export async function createIdentityWithKeys(
  c: Clients,
  n: number,
  identity: MessageInitShape<typeof CreateIdentityRequestSchema>,
  key: Partial<CreateKeyInit> = {},
): Promise<{ identityId: string; keys: string[]; keyIds: string[] }> {
  const { identity: created } = await c.identities.createIdentity(identity);
  const keys: string[] = [];
  const keyIds: string[] = [];
  for (let i = 0; i < n; i++) {
    const k = await createKey(c, { ...key, identity: { case: "identityId", value: created!.id } });
    keys.push(k.plaintext);
    keyIds.push(k.id);
  }
  return { identityId: created!.id, keys, keyIds };
}

export const past = (ms = MINUTE) => timestampFromMs(Date.now() - ms);
export const future = (ms = 3600_000) => timestampFromMs(Date.now() + ms);

/** Wraps a store so that every call of every method is counted by name; the real store does the work. */
export function countingStore(store: Store): { store: Store; calls: Map<string, number>; reset(): void } {
  const calls = new Map<string, number>();
  const wrapped = new Proxy(store, {
    get(target, prop, receiver) {
      const v = Reflect.get(target, prop, receiver);
      if (typeof v !== "function") return v;
      return (...args: unknown[]) => {
        calls.set(String(prop), (calls.get(String(prop)) ?? 0) + 1);
        return (v as (...a: unknown[]) => unknown).apply(target, args);
      };
    },
  });
  return { store: wrapped, calls, reset: () => calls.clear() };
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * Polls `probe` every `everyMs` until it returns true or `deadlineMs` has
 * passed; returns how long it took, or throws with the last value seen.
 */
export async function within(deadlineMs: number, everyMs: number, probe: () => Promise<{ ok: boolean; seen: unknown }>): Promise<number> {
  const started = Date.now();
  let last: unknown;
  for (;;) {
    const r = await probe();
    if (r.ok) return Date.now() - started;
    last = r.seen;
    if (Date.now() - started >= deadlineMs) throw new Error(`not within ${deadlineMs} ms; last seen: ${JSON.stringify(last)}`);
    await sleep(everyMs);
  }
}

/**
 * Whether MONGODB_URI is FerretDB, which applies updates as a read and a write
 * (no atomic $inc). Asked once, synchronously, so suites can choose at collection time.
 */
let ferret: boolean | undefined;
export function isFerretDb(): boolean {
  const uri = mongodbUri();
  if (!uri) return false;
  const script = `const {MongoClient}=require("mongodb");const c=new MongoClient(process.argv[1]);c.db("admin").command({buildInfo:1}).then(i=>{process.stdout.write(String("ferretdbVersion" in i));return c.close()})`;
  ferret ??= execFileSync(process.execPath, ["-e", script, uri], { encoding: "utf8" }).trim() === "true";
  return ferret;
}
