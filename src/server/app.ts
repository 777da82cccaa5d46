import http from "node:http";
import type { Config } from "../config/config.js";
import { createIdentityManager } from "../domain/identities.js";
import { createKeyManager } from "../domain/keys.js";
import { createRootKey, createRootKeyAuthenticator } from "../domain/root-keys.js";
import { HealthState } from "../rpc/health.js";
import { createAuthInterceptor, createObservabilityInterceptor } from "../rpc/interceptors.js";
import type { Store } from "../storage/store.js";
import { createServer, type LatchkeyServer } from "./http-server.js";
import type { Logger } from "./logger.js";
import { createMetrics, type Metrics } from "./metrics.js";
import { createRoutes } from "./routes.js";

export interface AppDeps {
  config: Config;
  store: Store;
  logger: Logger;
  metrics?: Metrics;
}

export interface App {
  server: LatchkeyServer;
  health: HealthState;
  metrics: Metrics;
  /** Binds the API port (and the metrics port unless 0); returns the API port. */
  start(): Promise<{ port: number; metricsPort: number | null }>;
  /** Graceful stop: NOT_SERVING, in-flight calls finish, then the store closes. */
  stop(): Promise<void>;
}

/** Wires one server from its dependencies. The store must be initialised. */
export function createApp(deps: AppDeps): App {
  const { config, store, logger } = deps;
  const metrics = deps.metrics ?? createMetrics();
  const health = new HealthState(store, logger);
  const identities = createIdentityManager({ store });
  const keys = createKeyManager({ store });
  const authenticate = createRootKeyAuthenticator({ store, cacheMs: config.rootKeyCacheMs });
  const server = createServer({
    routes: createRoutes({ identities, keys, health }),
    interceptors: [createObservabilityInterceptor({ logger, metrics }), createAuthInterceptor(authenticate)],
    tls: config.tls,
  });
  let metricsServer: http.Server | null = null;

  return {
    server,
    health,
    metrics,
    async start() {
      await health.start(config.healthCheckIntervalMs);
      const port = await server.listen(config.port, config.host);
      let metricsPort: number | null = null;
      if (config.metricsPort !== 0) {
        metricsServer = http.createServer(async (req, res) => {
          if (req.url !== "/metrics") {
            res.writeHead(404).end();
            return;
          }
          res.writeHead(200, { "content-type": metrics.registry.contentType }).end(await metrics.registry.metrics());
        });
        metricsPort = await new Promise<number>((resolve, reject) => {
          metricsServer!.once("error", reject);
          metricsServer!.listen(config.metricsPort, config.host, () => resolve((metricsServer!.address() as { port: number }).port));
        });
      }
      return { port, metricsPort };
    },
    async stop() {
      health.drain();
      await server.close(config.shutdownGraceMs);
      await new Promise<void>((resolve) => (metricsServer ? metricsServer.close(() => resolve()) : resolve()));
      await store.close();
    },
  };
}

/** On a fresh install, creates the bootstrap root key and returns its plaintext (once, ever). */
export async function bootstrapRootKey(store: Store): Promise<string | null> {
  const res = await createRootKey(store, "bootstrap", [{ action: "read", apiId: null }, { action: "write", apiId: null }, { action: "verify", apiId: null }, { action: "usage", apiId: null }], { first: true });
  return res?.plaintext ?? null;
}
