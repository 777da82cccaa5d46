import { Counter, Histogram, Registry, collectDefaultMetrics } from "prom-client";

/** Prometheus metrics of one server, on their own registry. */
export function createMetrics() {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: "latchkey_process_" });
  return {
    registry,
    rpcRequests: new Counter({
      name: "latchkey_rpc_requests_total",
      help: "RPCs handled, by method and status code.",
      labelNames: ["method", "code"] as const,
      registers: [registry],
    }),
    rpcDuration: new Histogram({
      name: "latchkey_rpc_duration_seconds",
      help: "RPC handling time, by method and status code.",
      labelNames: ["method", "code"] as const,
      buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5],
      registers: [registry],
    }),
    verifications: new Counter({
      name: "latchkey_verifications_total",
      help: "VerifyKey outcomes.",
      labelNames: ["code"] as const,
      registers: [registry],
    }),
    cacheLookups: new Counter({
      name: "latchkey_cache_lookups_total",
      help: "Verification cache lookups, by cache and result (hit, miss).",
      labelNames: ["cache", "result"] as const,
      registers: [registry],
    }),
    usageDropped: new Counter({
      name: "latchkey_usage_dropped_total",
      help: "Verification counts dropped because too many were pending while the store could not be written.",
      registers: [registry],
    }),
    storeDuration: new Histogram({
      name: "latchkey_store_duration_seconds",
      help: "Store operation time, by operation and result.",
      labelNames: ["op", "result"] as const,
      buckets: [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2],
      registers: [registry],
    }),
  };
}

export type Metrics = ReturnType<typeof createMetrics>;
