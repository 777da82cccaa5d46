/**
 * Helpers for the usage analytics tests: usage queries as plain numbers over
 * the in-process harness (../support/harness.ts), store wrappers that fail on
 * purpose, synthetic verifications at chosen times (so series can span several
 * buckets without waiting), and a spawner bookkeeping for real server processes
 * (../integration/support.ts) that afterAll kills.
 */
import { create } from "@bufbuild/protobuf";
import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { Granularity, UsageGroupBy, type UsageCounts, type UsageSeries } from "../../gen/latchkey/v1/usage_pb.js";
import type { GetIdentityUsageResponse } from "../../gen/latchkey/v1/identity_service_pb.js";
import type { GetKeyUsageResponse } from "../../gen/latchkey/v1/key_service_pb.js";
import { GetIdentityUsageRequestSchema } from "../../gen/latchkey/v1/identity_service_pb.js";
import type { Verification, VerificationCode } from "../../src/domain/verify.js";
import type { Store } from "../../src/storage/store.js";
import { COUNTERS, emptyCounts, type Counts } from "../../src/domain/usage.js";
import type { Clients, Harness, HarnessOptions, StoreKind } from "../support/harness.js";
import { useHarness } from "../support/harness.js";
import type { ServerProcess } from "../integration/support.js";

export { describeEachStore, describeWith, mongodbUri, IN_CI } from "../verify/support.js";

export const MINUTE = 60_000;
export const HOUR = 3_600_000;
export const DAY = 86_400_000;

/** Start of the bucket holding `t`. */
export function floorTo(t: number, size: number): number {
  return t - (t % size);
}

/**
 * A fresh harness per test on `kind`, whose usage is written only by explicit
 * flushes (`h.core.recorder.flush()`) or a stop: the flush timer is an hour away.
 */
export function useUsageHarness(kind: StoreKind, opts: HarnessOptions = {}): () => Harness {
  return useHarness({ ...opts, store: kind, coreOptions: { usageFlushMs: HOUR, ...opts.coreOptions } });
}

/** Counts as plain numbers, named as in src/domain/usage.ts. */
export type PlainCounts = Counts;

export function plain(c: UsageCounts | undefined): PlainCounts {
  const out = emptyCounts();
  if (!c) return out;
  for (const k of COUNTERS) out[k] = Number(c[k]);
  return out;
}

/** Expected counts: zero everywhere except the given fields. */
export function counts(fields: Partial<PlainCounts>): PlainCounts {
  return { ...emptyCounts(), ...fields };
}

export function sumCounts(list: PlainCounts[]): PlainCounts {
  const out = emptyCounts();
  for (const c of list) for (const k of COUNTERS) out[k] += c[k];
  return out;
}

export interface PlainSeries {
  group: string;
  totals: PlainCounts;
  points: { time: number; counts: PlainCounts }[];
}

export interface PlainReport {
  start: number;
  end: number;
  totals: PlainCounts;
  series: PlainSeries[];
}

function plainSeries(s: UsageSeries): PlainSeries {
  return { group: s.group, totals: plain(s.totals), points: s.points.map((p) => ({ time: timestampMs(p.time!), counts: plain(p.counts) })) };
}

export function plainReport(r: GetIdentityUsageResponse | GetKeyUsageResponse): PlainReport {
  return { start: timestampMs(r.startTime!), end: timestampMs(r.endTime!), totals: plain(r.totals), series: r.series.map(plainSeries) };
}

export type GranularityName = "MINUTE" | "HOUR" | "DAY";
export type GroupByName = "NONE" | "KEY" | "OUTCOME" | "TAG";

export interface UsageParams {
  start?: number;
  end?: number;
  granularity?: GranularityName;
  groupBy?: GroupByName;
}

function requestFields(p: UsageParams) {
  return {
    startTime: p.start === undefined ? undefined : timestampFromMs(p.start),
    endTime: p.end === undefined ? undefined : timestampFromMs(p.end),
    granularity: p.granularity ? Granularity[p.granularity] : Granularity.UNSPECIFIED,
    groupBy: p.groupBy && p.groupBy !== "NONE" ? UsageGroupBy[p.groupBy] : UsageGroupBy.UNSPECIFIED,
  };
}

/** The last hour at MINUTE granularity unless told otherwise. */
function withDefaults(p: UsageParams): UsageParams {
  return { granularity: "MINUTE", start: Date.now() - HOUR, ...p };
}

export async function identityUsage(c: Clients, lookup: { id: string } | { externalId: string }, p: UsageParams = {}): Promise<PlainReport> {
  const req = create(GetIdentityUsageRequestSchema, {
    lookup: "id" in lookup ? { case: "id", value: lookup.id } : { case: "externalId", value: lookup.externalId },
    ...requestFields(withDefaults(p)),
  });
  return plainReport(await c.identities.getIdentityUsage(req));
}

export async function keyUsage(c: Clients, id: string, p: UsageParams = {}): Promise<PlainReport> {
  return plainReport(await c.keys.getKeyUsage({ id, ...requestFields(withDefaults(p)) }));
}

/** The raw request fields, for error tests that leave some out on purpose. */
export function rawUsageFields(p: UsageParams) {
  return requestFields(p);
}

/**
 * A verification of key `keyId` with outcome `code` as the verifier reports it,
 * for `recorder.record(v, input, at)` at a chosen time. The key and its identity
 * are read from the store as they are now.
 */
export async function verificationOf(store: Store, keyId: string, code: VerificationCode, spent = 0): Promise<Verification> {
  const key = await store.getKey(keyId);
  if (!key) throw new Error(`no key ${keyId}`);
  const identity = key.identityId ? await store.getIdentity(key.identityId) : null;
  return { code, key, identity, creditsRemaining: null, ratelimits: [], spent };
}

/** Records `n` verifications of `keyId` with `code` at time `at` through the harness's recorder. */
export async function recordAt(h: Harness, keyId: string, at: number, n = 1, code: VerificationCode = "VALID", tags: string[] = []): Promise<void> {
  const v = await verificationOf(h.store, keyId, code);
  for (let i = 0; i < n; i++) h.core.recorder.record(v, { key: "", apiId: "", permissions: "", ratelimits: [], cost: null, tags }, at);
}

/**
 * Wraps a store so that `method` fails the next `times` calls (until `heal()`).
 * With `afterWriting`, the real method runs first and then the call fails, as
 * when a write lands but its answer is lost.
 */
export function failingStore(
  store: Store,
  method: keyof Store,
  opts: { times?: number; afterWriting?: boolean } = {},
): { store: Store; failures: () => number; calls: () => number; heal: () => void } {
  let left = opts.times ?? 1;
  let failures = 0;
  let calls = 0;
  const wrapped = new Proxy(store, {
    get(target, prop, receiver) {
      const v = Reflect.get(target, prop, receiver);
      if (prop !== method || typeof v !== "function") return typeof v === "function" ? v.bind(target) : v;
      return async (...args: unknown[]) => {
        calls++;
        if (left > 0) {
          left--;
          failures++;
          if (opts.afterWriting) await (v as (...a: unknown[]) => Promise<unknown>).apply(target, args);
          throw new Error(`injected ${String(method)} failure`);
        }
        return (v as (...a: unknown[]) => Promise<unknown>).apply(target, args);
      };
    },
  });
  return { store: wrapped, failures: () => failures, calls: () => calls, heal: () => (left = 0) };
}

/**
 * Real server processes of one test file: every process registered here is
 * SIGKILLed by `killAll()` (call it in afterAll), whatever state the test left.
 */
export function processBook() {
  const all = new Set<ServerProcess>();
  return {
    add(p: ServerProcess): ServerProcess {
      all.add(p);
      void p.exited.then(() => all.delete(p));
      return p;
    },
    async killAll(): Promise<void> {
      await Promise.all([...all].map((p) => p.kill("SIGKILL")));
      all.clear();
    },
  };
}

/** Runs `fn` over `items` with at most `concurrency` in flight; results in item order. */
export async function pool<T, R>(items: T[], concurrency: number, fn: (item: T, i: number) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  const worker = async () => {
    for (;;) {
      const i = next++;
      if (i >= items.length) return;
      out[i] = await fn(items[i], i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, items.length) }, worker));
  return out;
}
