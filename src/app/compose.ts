import http from "node:http";
import { performance } from "node:perf_hooks";
import { Gauge } from "prom-client";
import { createInvalidationFeed } from "../cache/invalidation.js";
import { createVerificationCache } from "../cache/verification-cache.js";
import type { Config } from "../config/config.js";
import { createIdentityManager } from "../domain/identities.js";
import { createKeyManager } from "../domain/keys.js";
import { createOutageCredits } from "../domain/outage-credits.js";
import { createRootKey, createRootKeyAuthenticator } from "../domain/root-keys.js";
import { createVerifier, type VerificationListener } from "../domain/verify.js";
import { createMemoryCounter, type RateLimitCounter } from "../ratelimit/counter.js";
import { createCounter } from "./counters.js";
import { Health } from "../../gen/grpc/health/v1/health_pb.js";
import { HealthState } from "../rpc/health.js";
import { createAuthInterceptor, createObservabilityInterceptor } from "../rpc/interceptors.js";
import { connectJsonOptions } from "../rpc/well-formed.js";
import type { Store } from "../storage/store.js";
import { guardStore } from "./stores.js";
import { storeGuardOf } from "../storage/store-guard.js";
import { createServer, type LatchkeyServer } from "../server/http-server.js";
import type { Logger } from "../observability/logger.js";
import { createMetrics, fastSeries, type Metrics } from "../observability/metrics.js";
import { createServiceRegistrations, routesOf } from "../server/routes.js";
import { createUsageReader } from "../domain/usage-reader.js";
import { createUsageRecorder } from "../usage/recorder.js";

export type CoreOptions = Pick<
  Config,
  | "rootKeyCacheMs"
  | "cacheMaxEntries"
  | "cacheTtlMs"
  | "invalidationPollMs"
  | "feedStalePolicy"
  | "usageCounting"
  | "commitMarginMs"
  | "usageFlushMs"
  | "usageMinuteRetentionHours"
  | "usageHourRetentionDays"
  | "usageDayRetentionDays"
  | "lastUsedResolutionMs"
  | "outageCacheMs"
  | "storeProbeTimeoutMs"
  | "storeFailFastMs"
> &
  Partial<Pick<Config, "maxHealthWatchers" | "outageCreditAllowance">>;

/** How soon a reconciliation of credits admitted during an outage that failed is tried again (while the store answers). */
const RECONCILE_RETRY_MS = 1000;

/** After the store comes back, how long the cache may go on answering as during the outage while the change feed is read (catchingUp in createCore). */
const CATCH_UP_MS = 2000;

export const DEFAULT_CORE_OPTIONS: CoreOptions = {
  rootKeyCacheMs: 5000,
  cacheMaxEntries: 100_000,
  cacheTtlMs: 60_000,
  invalidationPollMs: 250,
  feedStalePolicy: "read-through",
  usageCounting: "on",
  commitMarginMs: 1,
  usageFlushMs: 1000,
  usageMinuteRetentionHours: 48,
  usageHourRetentionDays: 90,
  usageDayRetentionDays: 0,
  lastUsedResolutionMs: 60_000,
  outageCacheMs: 600_000,
  storeProbeTimeoutMs: 1000,
  storeFailFastMs: 25,
};

export interface CoreDeps {
  store: Store;
  logger: Logger;
  options?: CoreOptions;
  metrics?: Metrics;
  counter?: RateLimitCounter;
  onVerification?: VerificationListener;
  /** Monotonic clock of the change feed (tests drive the revocation bound with it). */
  feedClock?: () => number;
}

/**
 * Everything behind the port, wired: use cases, verification cache and its
 * change feed, routes and interceptors. Servers (createApp) and tests
 * (createRouterTransport over `routes` and `interceptors`) build on this.
 * The store is used behind its circuit breaker (src/storage/store-guard.ts):
 * the one it comes with (createServerStore), or one made here.
 */
export function createCore(deps: CoreDeps) {
  const { logger } = deps;
  const options = { ...DEFAULT_CORE_OPTIONS, ...deps.options };
  const metrics = deps.metrics ?? createMetrics();
  const ownGuard = storeGuardOf(deps.store) === null;
  const guard =
    storeGuardOf(deps.store) ??
    guardStore(deps.store, { probeTimeoutMs: options.storeProbeTimeoutMs, failFastMs: options.storeFailFastMs }, logger);
  const store = ownGuard ? guard.store : deps.store;
  const feedClock = deps.feedClock ?? (() => performance.now());
  /** When (on the feed's clock) the store last came back. */
  let backAt = -Infinity;
  /**
   * The store answers again but the change feed has not been read since: the
   * cache goes on answering as during the outage, for at most CATCH_UP_MS, so
   * that the store that just came back gets the feed's read first instead of
   * every verification (read-through, the feed being behind). README, "Store outages".
   */
  const catchingUp = () => feedClock() - backAt < CATCH_UP_MS && feed.lastComplete() < backAt;
  const cache = createVerificationCache({
    store,
    metrics,
    reachable: () => guard.reachable() && !catchingUp(),
    options: { maxEntries: options.cacheMaxEntries, ttlMs: options.cacheTtlMs, outageMs: options.outageCacheMs },
  });
  const health = new HealthState(store, logger, { maxWatchers: options.maxHealthWatchers });
  const allowance = options.outageCreditAllowance ?? 0;
  const reconciled = { balances: 0, charged: 0, uncharged: 0 };
  const outageCredits = createOutageCredits({
    ledger: store,
    allowance,
    reachable: guard.reachable,
    onOutageAdmission: () =>
      logger.warn({ allowance }, "the store cannot be reached: admitting credit spends from cached balances on trust, up to LATCHKEY_OUTAGE_CREDIT_ALLOWANCE per balance; they are charged once it answers"),
    onAdmitted: (n) => metrics.outageCreditsAdmitted.inc(n),
    onCharged: (c, ref) => {
      reconciled.balances++;
      reconciled.charged += c.charged;
      reconciled.uncharged += c.admitted - c.charged;
      if (c.charged < c.admitted) metrics.outageCreditsUncharged.inc(c.admitted - c.charged);
      // The cached balance predates the outage: read it again.
      if (ref.keyHash) cache.evictKey(ref.keyHash);
      if (ref.identityId) cache.evictIdentity(ref.identityId);
    },
  });
  let reconcileTimer: NodeJS.Timeout | undefined;
  let stopping = false;
  /** Charges what was admitted on trust, retried every RECONCILE_RETRY_MS while the store answers (and at its next return). */
  const reconcile = async (): Promise<boolean> => {
    clearTimeout(reconcileTimer);
    try {
      const done = await outageCredits.reconcile();
      if (done && reconciled.balances > 0) {
        logger.info({ ...reconciled }, "charged the credits admitted on trust during the store outage");
        Object.assign(reconciled, { balances: 0, charged: 0, uncharged: 0 });
      }
      if (done) return true;
    } catch (err) {
      logger.warn({ err, pending: outageCredits.pending() }, "could not charge the credits admitted during the store outage yet; retrying");
    }
    if (!stopping && guard.reachable()) reconcileTimer = setTimeout(() => void reconcile(), RECONCILE_RETRY_MS).unref();
    return false;
  };
  // Health follows the breaker at once, not at its next ping; the change feed is read as soon as the store is back.
  const onStoreChange = (reachable: boolean) => {
    void health.check();
    if (reachable) {
      backAt = feedClock();
      void feed.sync();
      if (outageCredits.enabled) void reconcile();
    }
  };
  const onRefused = (op: string) => metrics.storeRefused.inc({ op });
  guard.events.on("change", onStoreChange);
  guard.events.on("refused", onRefused);
  metrics.store.probe = guard;
  const stalePolicy = options.feedStalePolicy ?? "read-through";
  const feed = createInvalidationFeed({
    store,
    cache,
    logger,
    metrics,
    clock: feedClock,
    options: { pollMs: options.invalidationPollMs, stalePolicy },
    // not-serving: a feed behind the revocation bound takes the instance out of service.
    onFreshness: (fresh) => {
      if (stalePolicy === "not-serving") health.setCondition("change-feed", fresh ? null : "the change feed was not read within 1 s");
    },
    // A feed read that hangs: find out now whether the store answers at all.
    onStalled: guard.suspect,
  });
  const identities = createIdentityManager({ store, afterWrite: feed.sync });
  const keys = createKeyManager({ store, afterWrite: feed.sync });
  const minuteRetentionMs = options.usageMinuteRetentionHours * 3_600_000;
  const hourRetentionMs = options.usageHourRetentionDays * 86_400_000;
  // 0: day rows are kept for ever.
  const dayRetentionMs = options.usageDayRetentionDays > 0 ? options.usageDayRetentionDays * 86_400_000 : null;
  const recorder = createUsageRecorder({
    store,
    logger,
    options: { flushMs: options.usageFlushMs, minuteRetentionMs, hourRetentionMs, dayRetentionMs, lastUsedResolutionMs: options.lastUsedResolutionMs },
    onDrop: (n) => metrics.usageDropped.inc(n),
  });
  const usage = createUsageReader({ store, minuteRetentionMs, hourRetentionMs, dayRetentionMs });
  const counting = options.usageCounting === "on";
  // One series per outcome, counted in a plain number (metrics.ts, fastSeries).
  const outcomes = new Map<string, { inc(): void }>();
  const outcome = (code: string) => {
    let c = outcomes.get(code);
    if (!c) outcomes.set(code, (c = fastSeries(metrics.verifications, { code })));
    return c;
  };
  const verify = createVerifier({
    store,
    cache,
    commitMarginMs: options.commitMarginMs,
    counter: deps.counter ?? createMemoryCounter(),
    outageCredits,
    onVerification: (v, input, at) => {
      outcome(v.code).inc();
      if (counting) recorder.record(v, input, at);
      deps.onVerification?.(v, input, at);
    },
  });
  const authenticate = createRootKeyAuthenticator({
    store,
    cacheMs: options.rootKeyCacheMs,
    outageMs: options.outageCacheMs,
    onStaleAnswer: () => metrics.cacheStaleAnswers.inc({ cache: "root_key" }),
    reachable: guard.reachable,
  });
  const services = createServiceRegistrations({ identities, keys, verify, usage, health });
  return {
    store,
    /** The store's circuit breaker. */
    guard,
    metrics,
    cache,
    feed,
    identities,
    keys,
    verify,
    recorder,
    usage,
    health,
    services,
    /** Credits admitted on trust during a store outage, and their reconciliation. */
    outageCredits,
    /** Charges what was admitted during an outage now (once; it is retried by itself while the store answers). */
    reconcileOutageCredits: reconcile,
    routes: routesOf(services),
    /** Checks `authorization: Bearer <root key>`; the transport calls it before reading a body. */
    authenticate,
    interceptors: [createObservabilityInterceptor({ logger, metrics }), createAuthInterceptor(authenticate)],
    /** Starts following the change feed and counting usage (call once the store is initialised). */
    async start() {
      await feed.start();
      recorder.start();
    },
    /** Stops background work and writes pending usage counts. */
    async stop() {
      guard.events.off("change", onStoreChange);
      guard.events.off("refused", onRefused);
      feed.stop();
      try {
        // Credits admitted during an outage are charged before the store closes.
        stopping = true;
        if (outageCredits.enabled && !(await reconcile())) {
          logger.error({ pending: outageCredits.pending() }, "could not charge the credits admitted on trust during the store outage; they are lost");
        }
        await recorder.stop();
      } finally {
        if (ownGuard) guard.stop();
      }
    },
  };
}

export type Core = ReturnType<typeof createCore>;

export interface AppDeps {
  config: Config;
  store: Store;
  logger: Logger;
  metrics?: Metrics;
}

export interface App {
  core: Core;
  server: LatchkeyServer;
  health: HealthState;
  metrics: Metrics;
  /** Binds the API port (and the metrics port unless 0). */
  start(): Promise<{ port: number; metricsPort: number | null }>;
  /** Graceful stop: NOT_SERVING, in-flight calls finish, then the store closes. */
  stop(): Promise<void>;
}

/** Wires one server from its dependencies. The store must be initialised. */
export function createApp(deps: AppDeps): App {
  const { config, store, logger } = deps;
  const counter = createCounter(config, store, logger);
  const core = createCore({ store, logger, options: config, metrics: deps.metrics, counter: counter.counter });
  const { metrics, health } = core;
  new Gauge({
    name: "latchkey_ratelimit_pools_shared",
    help: "1 when rate-limit pools are counted where every instance counts them (Redis, MongoDB); 0 when per process (N instances admit N times a limit).",
    registers: [metrics.registry],
  }).set(counter.shared ? 1 : 0);
  const server = createServer({
    routes: core.routes,
    services: core.services,
    interceptors: core.interceptors,
    tls: config.tls,
    authenticate: core.authenticate,
    limits: config,
    logger,
    metrics,
    // Watchers past the bound are refused at the door, before Connect-Node sets up a stream.
    gates: new Map([[`/${Health.typeName}/Watch`, () => health.watchRefusal()]]),
    // Invalid UTF-8 in Connect JSON is marked and refused like in binary (src/rpc/well-formed.ts).
    jsonOptions: connectJsonOptions,
  });
  let metricsServer: http.Server | null = null;

  return {
    core,
    server,
    health,
    metrics,
    async start() {
      await core.start();
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
      logger.debug("stop: connections closed");
      // The last usage counts get as long as the calls did, and closing the
      // counter and the store as long again: a store that does not answer must
      // not keep the process from stopping.
      const grace = config.shutdownGraceMs;
      const written = await within(grace, core.stop());
      if (written === "done") logger.debug("stop: usage written");
      else logger.error({ err: written, lostEntries: core.recorder.pendingEntries() }, "could not write the last usage counts; they are lost");
      await new Promise<void>((resolve) => (metricsServer ? metricsServer.close(() => resolve()) : resolve()));
      const closed = await within(grace, Promise.all([counter.close(), store.close()]));
      if (closed !== "done") logger.warn({ err: closed }, "the store or the rate-limit counter did not close cleanly");
    },
  };
}

/** Waits for `p` at most `ms`: "done", or why not (its error, or the time it did not finish in). */
async function within(ms: number, p: Promise<unknown>): Promise<string> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p.then(
        () => "done",
        (err: Error) => err.message,
      ),
      new Promise<string>((resolve) => (timer = setTimeout(() => resolve(`not finished within ${ms} ms`), ms))),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** On a fresh install, creates the bootstrap root key and returns its plaintext (once, ever). */
export async function bootstrapRootKey(store: Store): Promise<string | null> {
  const res = await createRootKey(
    store,
    "bootstrap",
    (["read", "write", "verify", "usage"] as const).map((action) => ({ action, apiId: null })),
    { first: true },
  );
  return res?.plaintext ?? null;
}
