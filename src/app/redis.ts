import { Redis } from "ioredis";
import { SPEND_NOW } from "../storage/redis-credits.js";

/**
 * The Redis client a server uses for rate-limit counters and credit balances.
 *
 * Auto-pipelining: the commands issued in one turn of the event loop — under
 * load, the rate-limit scripts of every verification that turn — go out in one
 * write and come back in one read. Measured on the MongoDB bench run
 * (docs/performance.md, "Redis auto-pipelining"): Redis's CPU per verification
 * 42 → 12 µs and the server's main thread 174 → 123 µs. Each command still runs
 * on its own in Redis (a pipeline is not a transaction), so the atomicity of
 * the Lua scripts is unchanged; MULTI and the other commands ioredis keeps out
 * of auto-pipelines go out as before. One command is kept out: the credit
 * spend of the only balance an instance is spending from (SPEND_NOW), which
 * auto-pipelining would hold for another turn of the event loop to make a
 * pipeline of one (docs/credits.md, "One hot balance").
 */
export function createRedisClient(url: string): Redis {
  const client = new Redis(url, { lazyConnect: false, maxRetriesPerRequest: 2, enableOfflineQueue: true, enableAutoPipelining: true, autoPipeliningIgnoredCommands: [SPEND_NOW] });
  client.on("error", () => undefined); // surfaced per call as UNAVAILABLE
  return client;
}
