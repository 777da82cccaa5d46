import { Redis } from "ioredis";
import { join } from "node:path";
import type { Config } from "../config/config.js";
import type { Logger } from "../observability/logger.js";
import { SqliteStore } from "../storage/embedded/sqlite-store.js";
import { MongoStore } from "../storage/mongodb/mongo-store.js";
import { RedisCreditsStore } from "../storage/redis-credits.js";
import type { Store } from "../storage/store.js";

/** The store the configuration selects (not yet initialised). */
export function createStore(config: Config): Store {
  if (config.store === "mongodb") {
    return new MongoStore({ uri: config.mongodbUri!, database: config.mongodbDatabase });
  }
  return new SqliteStore(join(config.dataDir, "latchkey.db"));
}

/**
 * The store a server runs on: with the redis credits backend, the MongoDB store
 * with its balances held in Redis (src/storage/redis-credits.ts).
 */
export function createServerStore(config: Config, logger?: Logger): Store {
  const store = createStore(config);
  if (config.creditsBackend !== "redis" || !(store instanceof MongoStore)) return store;
  const client = new Redis(config.redisUrl!, { lazyConnect: false, maxRetriesPerRequest: 2, enableOfflineQueue: true });
  client.on("error", () => undefined); // surfaced per call as UNAVAILABLE
  return new RedisCreditsStore(store, client, { flushMs: config.creditsFlushMs, logger, ownsClient: true });
}
