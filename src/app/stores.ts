import { join } from "node:path";
import type { Config } from "../config/config.js";
import type { Logger } from "../observability/logger.js";
import { SqliteStore } from "../storage/embedded/sqlite-store.js";
import { MongoStore } from "../storage/mongodb/mongo-store.js";
import { RedisCreditsStore } from "../storage/redis-credits.js";
import { createStoreGuard, type StoreGuard, type StoreGuardOptions } from "../storage/store-guard.js";
import type { Store } from "../storage/store.js";
import { createRedisClient } from "./redis.js";

/** The store the configuration selects (not yet initialised). */
export function createStore(config: Config): Store {
  if (config.store === "mongodb") {
    return new MongoStore({ uri: config.mongodbUri!, database: config.mongodbDatabase, usageRollupMs: config.usageRollupMs });
  }
  return new SqliteStore(join(config.dataDir, "latchkey.db"));
}

/**
 * The store a server runs on, behind its circuit breaker (store-guard.ts): with
 * the redis credits backend, the MongoDB store with its balances held in Redis
 * (src/storage/redis-credits.ts) — guarded on both layers by one breaker, so
 * that spends from Redis go on while MongoDB cannot be reached and a balance
 * that must be loaded from MongoDB fails fast.
 */
export function createServerStore(config: Config, logger?: Logger): Store {
  const store = createStore(config);
  const guard = guardStore(store, { probeTimeoutMs: config.storeProbeTimeoutMs, failFastMs: config.storeFailFastMs }, logger);
  if (config.creditsBackend !== "redis" || !(store instanceof MongoStore)) return guard.store;
  const client = createRedisClient(config.redisUrl!);
  const ledger = new RedisCreditsStore(guard.store as MongoStore, client, { flushMs: config.creditsFlushMs, leaseMax: config.creditsLeaseMax, logger, ownsClient: true });
  return guard.wrap(ledger, ["spendCredits", "returnCredits"]);
}

/**
 * `store` behind a circuit breaker (store-guard.ts). On MongoDB the driver's
 * own signs of a lost server — a pooled connection closed, a failed heartbeat —
 * make it probe at once: operations issued meanwhile would only wait in server
 * selection, without failing, for serverSelectionTimeoutMS.
 */
export function guardStore<T extends Store>(store: T, options: StoreGuardOptions, logger?: Logger): StoreGuard<T> {
  const guard = createStoreGuard(store, options, { logger });
  const mongo = mongoStoreOf(store);
  if (mongo) {
    mongo.client.on("serverHeartbeatFailed", guard.suspect);
    mongo.client.on("serverDescriptionChanged", (e) => {
      if (e.newDescription.type === "Unknown") guard.suspect();
    });
  }
  return guard;
}

/** The MongoDB store behind `store`, if there is one (its client's events tell the guard of a lost server). */
function mongoStoreOf(store: Store): MongoStore | null {
  if (store instanceof MongoStore) return store;
  if (store instanceof RedisCreditsStore) return store.inner;
  return null;
}
