import type { Config } from "../config/config.js";
import type { Store } from "../storage/store.js";
import type { Logger } from "../observability/logger.js";
import { createMemoryCounter, createMongoCounter, createRedisCounter, type RateLimitCounter } from "../ratelimit/counter.js";
import { createRedisClient } from "./redis.js";

/**
 * The counter backend the configuration selects, and how to release it.
 * `shared`: whether every instance counts in the same place. On FerretDB
 * without Redis the default is in-process counting (FerretDB applies updates as
 * a read and a write, so the mongodb backend is refused there): exact for one
 * instance, but N instances admit N times a shared limit. That is said plainly
 * at start (an error-level log line) and by the metric
 * latchkey_ratelimit_pools_shared (0), without stopping the server.
 */
export function createCounter(
  config: Pick<Config, "ratelimitBackend" | "ratelimitLeaseMax" | "redisUrl" | "mongodbDatabase">,
  store: Store,
  logger?: Logger,
): { counter: RateLimitCounter; close: () => Promise<void>; shared: boolean } {
  const caps = store.capabilities;
  const mongo = caps.counterClient;
  // A store that offers a counter client but cannot update atomically: FerretDB.
  const ferret = !!mongo && !caps.atomicUpdates;
  let backend = config.ratelimitBackend;
  if (backend === "auto") backend = config.redisUrl ? "redis" : mongo && !ferret ? "mongodb" : "memory";
  if (backend === "mongodb" && ferret) {
    throw new Error("LATCHKEY_RATELIMIT_BACKEND=mongodb needs MongoDB: FerretDB does not apply $inc atomically; use LATCHKEY_REDIS_URL");
  }
  if (backend === "memory" && caps.shared) {
    logger?.error(
      { ratelimitBackend: "memory", store: ferret ? "ferretdb" : "mongodb" },
      "rate-limit pools are counted per process: N instances admit N times a shared limit. Set LATCHKEY_REDIS_URL to share them" +
        (ferret ? " (FerretDB cannot hold them)." : " (or LATCHKEY_RATELIMIT_BACKEND=mongodb)."),
    );
  }
  switch (backend) {
    case "redis": {
      const client = createRedisClient(config.redisUrl!);
      const counter = createRedisCounter(client, { leaseMax: config.ratelimitLeaseMax });
      return {
        counter,
        close: async () => {
          counter.stop();
          // Unused leased tokens go back to their windows, for the other instances.
          await counter.returnLeases().catch(() => undefined);
          await client.quit().catch(() => client.disconnect());
        },
        shared: true,
      };
    }
    case "mongodb":
      if (!mongo) throw new Error("the mongodb rate-limit backend needs the mongodb store");
      return { counter: createMongoCounter(mongo, config.mongodbDatabase), close: async () => undefined, shared: true };
    default:
      // One process on the embedded store is the whole deployment: its pools are shared.
      return { counter: createMemoryCounter(), close: async () => undefined, shared: !caps.shared };
  }
}
