import { createVerificationCache } from "../src/cache/verification-cache.js";
import { SqliteStore } from "../src/storage/embedded/sqlite-store.js";

/**
 * Heap per cached key: loads every key (and its identity) of the seeded store
 * into a verification cache and compares heap use after full GCs.
 * Run with --expose-gc: node --expose-gc dist/bench/memory.js <db file> <hashes file>
 */
const [dbFile, hashesFile] = process.argv.slice(2);
const gc = (globalThis as { gc?: () => void }).gc;
if (!gc) throw new Error("run with --expose-gc");
const { readFileSync } = await import("node:fs");
const hashes = JSON.parse(readFileSync(hashesFile, "utf8")) as string[];
const store = new SqliteStore(dbFile);
await store.init();
const cache = createVerificationCache({ store, options: { maxEntries: 1_000_000, ttlMs: 3_600_000 } });
// Warm the code paths and statement cache before measuring.
await cache.getKeyByHash("0".repeat(64));
gc();
gc();
const before = process.memoryUsage().heapUsed;
for (const h of hashes) {
  const k = await cache.getKeyByHash(h);
  if (k?.identityId) await cache.getIdentity(k.identityId);
}
gc();
gc();
const after = process.memoryUsage().heapUsed;
const stats = cache.stats();
process.stdout.write(JSON.stringify({ keys: stats.keys, identities: stats.identities, bytes: after - before, bytesPerKey: Math.round((after - before) / stats.keys) }) + "\n");
await store.close();
