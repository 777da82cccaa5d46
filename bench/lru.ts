import { LRUCache } from "lru-cache";
import { createVerificationCache } from "../src/cache/verification-cache.js";
import type { IdentityRecord, KeyRecord } from "../src/domain/types.js";

/**
 * Our verification cache (src/cache/lru.ts + single-flight fills in
 * verification-cache.ts) against lru-cache's LRUCache with `fetchMethod`, in
 * one process, same run, alternating rounds. Both read through the same fake
 * store, which answers on the next microtask and counts its reads.
 *
 *   npm run build && node dist/bench/lru.js
 *
 * Scenarios (BENCH_LRU_ROUNDS rounds each, median reported):
 * - hit:  lookups of keys that are all cached (the steady state of VerifyKey);
 * - mix:  lookups over twice as many keys as fit (half miss, evictions), 64 in flight;
 * - herd: 1,000 concurrent lookups of one uncached key, repeated (single flight: one store read each).
 */
const MAX = 10_000;
const HIT_LOOKUPS = 1_000_000;
const MIX_LOOKUPS = 200_000;
const HERDS = 200;
const ROUNDS = Number(process.env.BENCH_LRU_ROUNDS ?? 7);

const hashes = Array.from({ length: 2 * MAX }, (_, i) => `h${i.toString(16).padStart(63, "0")}`);
const records = new Map<string, KeyRecord>(
  hashes.map((h, i) => [
    h,
    {
      id: `key_${i}`,
      apiId: "api_1",
      hash: h,
      start: "sk_1234",
      identityId: null,
      name: "",
      meta: {},
      permissions: [],
      enabled: true,
      expiresAt: null,
      credits: null,
      ratelimits: [],
      createdAt: 0,
      updatedAt: 0,
      lastUsedAt: null,
      version: 1,
    } satisfies KeyRecord,
  ]),
);

let storeReads = 0;
const store = {
  async getKeyByHash(hash: string): Promise<KeyRecord | null> {
    storeReads++;
    await Promise.resolve();
    return records.get(hash) ?? null;
  },
  async getIdentity(): Promise<IdentityRecord | null> {
    storeReads++;
    return null;
  },
};

type Lookup = (hash: string) => Promise<KeyRecord | null>;

function ours(): Lookup {
  const cache = createVerificationCache({ store, options: { maxEntries: MAX, ttlMs: 3_600_000 } });
  return (h) => cache.getKeyByHash(h);
}

/** lru-cache holds no null: "no such key" is a sentinel object, as it would have to be in src/cache. */
const NONE = { none: true } as const;
function theirs(): Lookup {
  const cache = new LRUCache<string, KeyRecord | typeof NONE>({
    max: MAX,
    ttl: 3_600_000,
    ttlAutopurge: false,
    fetchMethod: async (h) => (await store.getKeyByHash(h)) ?? NONE,
  });
  return async (h) => {
    const v = await cache.fetch(h);
    return v === NONE || v === undefined ? null : (v as KeyRecord);
  };
}

async function hit(get: Lookup): Promise<number> {
  for (let i = 0; i < MAX; i++) await get(hashes[i]);
  const t = performance.now();
  for (let i = 0; i < HIT_LOOKUPS; i++) await get(hashes[i % MAX]);
  return HIT_LOOKUPS / ((performance.now() - t) / 1000);
}

async function mix(get: Lookup): Promise<number> {
  let x = 12345;
  const t = performance.now();
  for (let done = 0; done < MIX_LOOKUPS; done += 64) {
    const batch: Promise<unknown>[] = [];
    for (let j = 0; j < 64; j++) {
      x = (x * 1103515245 + 12345) & 0x7fffffff;
      batch.push(get(hashes[x % hashes.length]));
    }
    await Promise.all(batch);
  }
  return MIX_LOOKUPS / ((performance.now() - t) / 1000);
}

async function herd(get: Lookup): Promise<{ perSec: number; readsPerHerd: number }> {
  const before = storeReads;
  const t = performance.now();
  for (let i = 0; i < HERDS; i++) {
    const h = hashes[MAX + i];
    await Promise.all(Array.from({ length: 1000 }, () => get(h)));
  }
  return { perSec: (HERDS * 1000) / ((performance.now() - t) / 1000), readsPerHerd: (storeReads - before) / HERDS };
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const impls = { ours, "lru-cache": theirs } as const;
const results: Record<string, { hit: number[]; mix: number[]; herd: number[]; readsPerHerd: number }> = {};
for (const name of Object.keys(impls)) results[name] = { hit: [], mix: [], herd: [], readsPerHerd: 0 };

for (let r = 0; r < ROUNDS; r++) {
  // Alternate which goes first, so neither always runs on a warmer JIT or a fuller heap.
  const order = r % 2 === 0 ? (["ours", "lru-cache"] as const) : (["lru-cache", "ours"] as const);
  for (const name of order) {
    const res = results[name];
    res.hit.push(await hit(impls[name]()));
    res.mix.push(await mix(impls[name]()));
    const h = await herd(impls[name]());
    res.herd.push(h.perSec);
    res.readsPerHerd = h.readsPerHerd;
  }
}

const fmt = (n: number) => Math.round(n).toLocaleString("en-US");
process.stdout.write(`node ${process.version}, lru-cache 11, ${ROUNDS} rounds, median lookups/s\n`);
process.stdout.write(`${"".padEnd(10)} ${"hit".padStart(12)} ${"mix".padStart(12)} ${"herd".padStart(12)}  store reads per herd of 1000\n`);
for (const [name, r] of Object.entries(results)) {
  process.stdout.write(
    `${name.padEnd(10)} ${fmt(median(r.hit)).padStart(12)} ${fmt(median(r.mix)).padStart(12)} ${fmt(median(r.herd)).padStart(12)}  ${r.readsPerHerd}\n`,
  );
}
