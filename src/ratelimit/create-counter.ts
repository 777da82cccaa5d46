import { Redis } from "ioredis";
import type { Config } from "../config/config.js";
import { MongoStore } from "../storage/mongodb/mongo-store.js";
import type { Store } from "../storage/store.js";
import { createMemoryCounter, createMongoCounter, createRedisCounter, type RateLimitCounter } from "./counter.js";

/** The counter backend the configuration selects, and how to release it. */
export function createCounter(
  config: Pick<Config, "ratelimitBackend" | "redisUrl" | "mongodbDatabase">,
  store: Store,
): { counter: RateLimitCounter; close: () => Promise<void> } {
  switch (config.ratelimitBackend) {
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
