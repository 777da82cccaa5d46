import { Redis } from "ioredis";
import type { Config } from "../config/config.js";
import { MongoStore } from "../storage/mongodb/mongo-store.js";
import type { Store } from "../storage/store.js";
import type { Logger } from "../server/logger.js";
import { createMemoryCounter, createMongoCounter, createRedisCounter, type RateLimitCounter } from "./counter.js";

/**
 * The counter backend the configuration selects, and how to release it.
 * rate-limiter-flexible's MongoDB limiter counts with `$inc`, which FerretDB
 * does not apply atomically: on FerretDB the mongodb backend is refused, and the
 * default falls back to in-process counting (exact for one instance) with a warning.
 */
export function createCounter(
  config: Pick<Config, "ratelimitBackend" | "redisUrl" | "mongodbDatabase">,
  store: Store,
  logger?: Logger,
): { counter: RateLimitCounter; close: () => Promise<void> } {
  const ferret = store instanceof MongoStore && store.flavor === "ferretdb";
  let backend = config.ratelimitBackend;
  if (backend === "auto") {
    backend = config.redisUrl ? "redis" : store instanceof MongoStore && !ferret ? "mongodb" : "memory";
    if (ferret && backend === "memory") {
      logger?.warn("FerretDB cannot hold shared rate-limit counters; counting in this process. Set LATCHKEY_REDIS_URL when running several instances.");
    }
  }
  if (backend === "mongodb" && ferret) {
    throw new Error("LATCHKEY_RATELIMIT_BACKEND=mongodb needs MongoDB: FerretDB does not apply $inc atomically; use LATCHKEY_REDIS_URL");
  }
  switch (backend) {
    case "redis": {
      const client = new Redis(config.redisUrl!, { lazyConnect: false, maxRetriesPerRequest: 2, enableOfflineQueue: true });
      client.on("error", () => undefined); // surfaced per call as UNAVAILABLE
      return { counter: createRedisCounter(client), close: async () => void (await client.quit().catch(() => client.disconnect())) };
    }
    case "mongodb":
      if (!(store instanceof MongoStore)) throw new Error("the mongodb rate-limit backend needs the mongodb store");
      return { counter: createMongoCounter(store.client, config.mongodbDatabase), close: async () => undefined };
    default:
      return { counter: createMemoryCounter(), close: async () => undefined };
  }
}
