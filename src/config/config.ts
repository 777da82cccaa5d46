import { z } from "zod";

/**
 * Every setting, with its environment variable, flag, default and meaning.
 * This table is the schema: `loadConfig` parses it, the README's configuration
 * table documents it, and test/config.test.ts checks that the two agree.
 */
export const SETTINGS = {
  host: { env: "LATCHKEY_HOST", default: "127.0.0.1", doc: "Address the API port binds (0.0.0.0 in the container image)." },
  port: { env: "LATCHKEY_PORT", default: "8080", doc: "API port: gRPC, gRPC-Web and Connect over HTTP/2 (h2c or TLS) and HTTP/1.1." },
  metricsPort: { env: "LATCHKEY_METRICS_PORT", default: "9464", doc: "Prometheus `/metrics` port, bound on LATCHKEY_HOST; 0 turns it off." },
  store: { env: "LATCHKEY_STORE", default: "", doc: "`embedded` or `mongodb`. Default: `mongodb` when MONGODB_URI is set, else `embedded`." },
  dataDir: { env: "LATCHKEY_DATA_DIR", default: "./data", doc: "Directory of the embedded store's SQLite database." },
  mongodbUri: { env: "MONGODB_URI", default: "", doc: "MongoDB connection string; required for the mongodb store." },
  mongodbDatabase: { env: "LATCHKEY_MONGODB_DATABASE", default: "latchkey", doc: "MongoDB database name." },
  tlsCert: { env: "LATCHKEY_TLS_CERT", default: "", doc: "PEM certificate file; with LATCHKEY_TLS_KEY the port serves TLS (HTTP/2 by ALPN, HTTP/1.1)." },
  tlsKey: { env: "LATCHKEY_TLS_KEY", default: "", doc: "PEM private key file for LATCHKEY_TLS_CERT." },
  logLevel: { env: "LATCHKEY_LOG_LEVEL", default: "info", doc: "`debug`, `info`, `warn`, `error` or `silent`. Logs are JSON lines on stdout." },
  shutdownGraceMs: { env: "LATCHKEY_SHUTDOWN_GRACE_MS", default: "10000", doc: "On SIGTERM/SIGINT: how long in-flight calls may take before connections are closed, and then how long the last usage counts may take to write." },
  rootKeyCacheMs: { env: "LATCHKEY_ROOT_KEY_CACHE_MS", default: "5000", doc: "How long a checked root key is remembered; a revoked root key stops working within this time (while the store can be reached; see LATCHKEY_OUTAGE_CACHE_MS)." },
  cacheMaxEntries: { env: "LATCHKEY_CACHE_MAX_ENTRIES", default: "100000", doc: "Most keys (and as many identities) kept in the verification cache of each instance." },
  cacheTtlMs: { env: "LATCHKEY_CACHE_TTL_MS", default: "60000", doc: "Longest time a cached key or identity is used without a change event (a safety net; changes arrive through the change feed)." },
  invalidationPollMs: { env: "LATCHKEY_INVALIDATION_POLL_MS", default: "250", doc: "How often each instance reads the change feed (at most 500); revocation reaches every instance within this time plus a store round trip." },
  feedStalePolicy: { env: "LATCHKEY_FEED_STALE_POLICY", default: "read-through", doc: "What an instance does while it has not read the change feed for over 1 s, so a revocation may not have reached it: `read-through` verifies against the store instead of the cache; `not-serving` answers from the cache and reports NOT_SERVING through health, for the load balancer to take it out. Either way, while the store cannot be reached the cache answers as LATCHKEY_OUTAGE_CACHE_MS says. See docs/revocation.md." },
  ratelimitBackend: { env: "LATCHKEY_RATELIMIT_BACKEND", default: "", doc: "`memory`, `mongodb` or `redis`. Default: `redis` when LATCHKEY_REDIS_URL is set, else `mongodb` on a MongoDB server, else `memory` (embedded store, or FerretDB, whose updates are not atomic). Several instances need a shared backend." },
  ratelimitLeaseMax: { env: "LATCHKEY_RATELIMIT_LEASE_MAX", default: "1000", doc: "Redis rate-limit backend: most tokens of a pool's window an instance takes ahead in one round trip and then hands out itself (a lease: at most 1/64 of what the window has left, and only when that is at least 8), so a busy pool costs one Redis round trip per lease instead of one per call. Never admits more than the limit; near it every call goes to Redis. 0: every call's tokens are taken in Redis. See docs/credits.md, \"Rate-limit leases\"." },
  redisUrl: { env: "LATCHKEY_REDIS_URL", default: "", doc: "Redis URL (`redis://host:6379`) for the redis rate-limit backend and the redis credits backend." },
  creditsBackend: { env: "LATCHKEY_CREDITS_BACKEND", default: "", doc: "`store` or `redis`: where credit balances are spent. `redis` holds them in Redis and writes them back to MongoDB (docs/credits.md). Default: `redis` with the mongodb store when LATCHKEY_REDIS_URL is set, else `store`. Every instance must use the same." },
  commitMarginMs: { env: "LATCHKEY_COMMIT_MARGIN_MS", default: "1", doc: "A verification does not commit (spend) when less than this much of its call's deadline is left: its answer could not reach the client in time. 0 commits until the deadline." },
  creditsFlushMs: { env: "LATCHKEY_CREDITS_FLUSH_MS", default: "1000", doc: "With the redis credits backend: how often balances are written back to MongoDB. A Redis that loses its data forgets at most this much spending." },
  creditsLeaseMax: { env: "LATCHKEY_CREDITS_LEASE_MAX", default: "1000", doc: "With the redis credits backend: most credits of a busy balance an instance takes ahead in one round trip and spends itself for up to 250 ms (a lease: at most 1/1,024 of what is left, and only when that is at least 8; sized to what the instance spent from the last one), so a hot customer's spends cost one Redis round trip per lease instead of one per batch. Never admits more than the balance; a SET or DECREMENT of the balance waits (up to ~350 ms) until leases are back or expired; a killed instance strands at most one lease per balance (fewer VALID, never more). 0: every spend goes to Redis. See docs/credits.md, \"Credit leases\"." },
  usageCounting: { env: "LATCHKEY_USAGE_COUNTING", default: "on", doc: "`on` or `off`: count verifications for usage analytics and last_used_at (off: the usage RPCs answer from what was counted before)." },
  usageFlushMs: { env: "LATCHKEY_USAGE_FLUSH_MS", default: "1000", doc: "How often counted verifications are written. A crash loses at most this much usage; a graceful stop loses none." },
  usageMinuteRetentionHours: { env: "LATCHKEY_USAGE_MINUTE_RETENTION_HOURS", default: "48", doc: "How long minute buckets are kept (hour buckets: LATCHKEY_USAGE_HOUR_RETENTION_DAYS; day buckets are kept)." },
  usageHourRetentionDays: { env: "LATCHKEY_USAGE_HOUR_RETENTION_DAYS", default: "90", doc: "How long hour buckets are kept." },
  usageDayRetentionDays: { env: "LATCHKEY_USAGE_DAY_RETENTION_DAYS", default: "0", doc: "How long day buckets are kept; 0 keeps them for ever." },
  usageRollupMs: { env: "LATCHKEY_USAGE_ROLLUP_MS", default: "30000", doc: "MongoDB store: a flush of usage counts is one insert into a log, applied to the usage rows this often (reads add what is not applied yet, so usage is as fresh either way; see docs/usage-storage.md). On the bucketed key layout, also how often last_used_at times are written. At least 1000, at most 600000." },
  lastUsedResolutionMs: { env: "LATCHKEY_LAST_USED_RESOLUTION_MS", default: "60000", doc: "A key's last_used_at is written again only once it would move by at least this much (so it trails the last use by at most this plus LATCHKEY_USAGE_FLUSH_MS); 0 writes it on every flush. One write per key per flush was half of FerretDB's CPU under load." },
  healthCheckIntervalMs: { env: "LATCHKEY_HEALTH_CHECK_INTERVAL_MS", default: "2000", doc: "How often the store is pinged for the health service (a ping not answered within LATCHKEY_STORE_PROBE_TIMEOUT_MS marks the store unreachable)." },
  outageCacheMs: { env: "LATCHKEY_OUTAGE_CACHE_MS", default: "600000", doc: "While the store cannot be reached, how long VerifyKey keeps answering from the cache: keys, identities and root keys as of this instance's last read of the change feed (or of the store), at most this old. Past it, or for what is not cached, UNAVAILABLE. 0: never answer without the store. At most 3600000. See README, \"Store outages\"." },
  outageCreditAllowance: { env: "LATCHKEY_OUTAGE_CREDIT_ALLOWANCE", default: "0", doc: "With the `store` credits backend: credits one instance may admit from one key's or identity's balance while the store cannot be reached (a cached balance, never more than it holds), charged once the store answers again. 0 refuses such spends with UNAVAILABLE. A platform may over-admit up to this many per balance per instance. See README, \"Store outages\"." },
  storeProbeTimeoutMs: { env: "LATCHKEY_STORE_PROBE_TIMEOUT_MS", default: "1000", doc: "A store ping (the health check, or the probe after a call found the store unreachable) not answered within this long marks the store unreachable: calls that need it then fail fast, health turns NOT_SERVING, and the store is probed until it answers." },
  storeFailFastMs: { env: "LATCHKEY_STORE_FAIL_FAST_MS", default: "25", doc: "Once the store is known unreachable, how long a call that needs it waits for it to come back before failing with UNAVAILABLE (a write refused so wrote nothing). 0 fails at once; a few seconds rides out a short failover." },
  maxMessageBytes: { env: "LATCHKEY_MAX_MESSAGE_BYTES", default: "4194304", doc: "Largest message, request or response, on every protocol (gRPC, gRPC-Web, Connect), counted after decompression; larger is RESOURCE_EXHAUSTED." },
  publicMaxMessageBytes: { env: "LATCHKEY_PUBLIC_MAX_MESSAGE_BYTES", default: "65536", doc: "Largest request message to the services that need no root key (health, reflection)." },
  maxConnections: { env: "LATCHKEY_MAX_CONNECTIONS", default: "1000", doc: "Most open connections on the API port. Past it, the oldest connection that has not sent a request yet is closed to make room (the new one, if every other has sent one)." },
  maxConcurrentStreams: { env: "LATCHKEY_MAX_CONCURRENT_STREAMS", default: "100", doc: "Most concurrent calls on one HTTP/2 connection (advertised to clients; more are refused with REFUSED_STREAM)." },
  maxHeaderBytes: { env: "LATCHKEY_MAX_HEADER_BYTES", default: "16384", doc: "Largest request header block (HTTP/1.1 headers, HTTP/2 header list)." },
  headersTimeoutMs: { env: "LATCHKEY_HEADERS_TIMEOUT_MS", default: "10000", doc: "Time a new connection has to finish its TLS handshake and send the HTTP/2 preface and SETTINGS or the first HTTP/1.1 request headers, and each HTTP/1.1 request its headers; slower connections are closed." },
  requestTimeoutMs: { env: "LATCHKEY_REQUEST_TIMEOUT_MS", default: "30000", doc: "Time a call's request (headers and body) has to arrive whole; an HTTP/2 stream still sending is reset, an HTTP/1.1 request gets 408. At least LATCHKEY_HEADERS_TIMEOUT_MS." },
  idleTimeoutMs: { env: "LATCHKEY_IDLE_TIMEOUT_MS", default: "65000", doc: "An HTTP/2 connection without open calls (pings do not keep it open), or an HTTP/1.1 keep-alive connection between requests, is closed after this long (longer than the 60 s of common load balancers, so they close first)." },
  maxHealthWatchers: { env: "LATCHKEY_MAX_HEALTH_WATCHERS", default: "1000", doc: "Most concurrent health Watch streams on one instance; more are refused with RESOURCE_EXHAUSTED." },
} as const;

export type SettingName = keyof typeof SETTINGS;

/** A number from the environment; text that is not one is refused naming the variable. */
const num = (name: string) => z.coerce.number({ error: `${name} must be a number` });
const port = (name: string) =>
  num(name)
    .int(`${name} must be a whole number`)
    .min(0, `${name} must be 0-65535`)
    .max(65535, `${name} must be 0-65535`);
const positiveMs = (name: string, min: number) =>
  num(name).int(`${name} must be a whole number of milliseconds`).min(min, `${name} must be at least ${min}`);
const whole = (name: string, min: number) => num(name).int(`${name} must be a whole number`).min(min, `${name} must be at least ${min}`);
const bytes = (name: string, min: number, max: number) =>
  num(name).int(`${name} must be a whole number of bytes`).min(min, `${name} must be at least ${min}`).max(max, `${name} must be at most ${max}`);

const schema = z
  .object({
    host: z.string().min(1, "LATCHKEY_HOST must not be empty"),
    port: port("LATCHKEY_PORT"),
    metricsPort: port("LATCHKEY_METRICS_PORT"),
    store: z.enum(["", "embedded", "mongodb"], { message: "LATCHKEY_STORE must be `embedded` or `mongodb`" }),
    dataDir: z.string().min(1, "LATCHKEY_DATA_DIR must not be empty"),
    mongodbUri: z.string().refine((v) => v === "" || /^mongodb(\+srv)?:\/\//.test(v), "MONGODB_URI must start with mongodb:// or mongodb+srv://"),
    mongodbDatabase: z.string().regex(/^[A-Za-z0-9_-]{1,63}$/, "LATCHKEY_MONGODB_DATABASE must be 1-63 letters, digits, _ or -"),
    tlsCert: z.string(),
    tlsKey: z.string(),
    logLevel: z.enum(["debug", "info", "warn", "error", "silent"], { message: "LATCHKEY_LOG_LEVEL must be debug, info, warn, error or silent" }),
    shutdownGraceMs: positiveMs("LATCHKEY_SHUTDOWN_GRACE_MS", 0),
    rootKeyCacheMs: positiveMs("LATCHKEY_ROOT_KEY_CACHE_MS", 0),
    healthCheckIntervalMs: positiveMs("LATCHKEY_HEALTH_CHECK_INTERVAL_MS", 100),
    outageCacheMs: positiveMs("LATCHKEY_OUTAGE_CACHE_MS", 0).max(3_600_000, "LATCHKEY_OUTAGE_CACHE_MS must be at most 3600000 (1 hour)"),
    outageCreditAllowance: whole("LATCHKEY_OUTAGE_CREDIT_ALLOWANCE", 0).max(Number.MAX_SAFE_INTEGER, "LATCHKEY_OUTAGE_CREDIT_ALLOWANCE must be at most 9007199254740991"),
    storeProbeTimeoutMs: positiveMs("LATCHKEY_STORE_PROBE_TIMEOUT_MS", 10).max(60_000, "LATCHKEY_STORE_PROBE_TIMEOUT_MS must be at most 60000"),
    storeFailFastMs: positiveMs("LATCHKEY_STORE_FAIL_FAST_MS", 0).max(30_000, "LATCHKEY_STORE_FAIL_FAST_MS must be at most 30000"),
    usageCounting: z.enum(["on", "off"], { message: "LATCHKEY_USAGE_COUNTING must be on or off" }),
    usageFlushMs: positiveMs("LATCHKEY_USAGE_FLUSH_MS", 50).max(60_000, "LATCHKEY_USAGE_FLUSH_MS must be at most 60000"),
    usageMinuteRetentionHours: num("LATCHKEY_USAGE_MINUTE_RETENTION_HOURS").int("LATCHKEY_USAGE_MINUTE_RETENTION_HOURS must be a whole number").min(1, "LATCHKEY_USAGE_MINUTE_RETENTION_HOURS must be at least 1"),
    usageHourRetentionDays: num("LATCHKEY_USAGE_HOUR_RETENTION_DAYS").int("LATCHKEY_USAGE_HOUR_RETENTION_DAYS must be a whole number").min(1, "LATCHKEY_USAGE_HOUR_RETENTION_DAYS must be at least 1"),
    usageRollupMs: positiveMs("LATCHKEY_USAGE_ROLLUP_MS", 1000).max(600_000, "LATCHKEY_USAGE_ROLLUP_MS must be at most 600000"),
    lastUsedResolutionMs: num("LATCHKEY_LAST_USED_RESOLUTION_MS").int("LATCHKEY_LAST_USED_RESOLUTION_MS must be a whole number").min(0, "LATCHKEY_LAST_USED_RESOLUTION_MS must be 0 or more").max(86_400_000, "LATCHKEY_LAST_USED_RESOLUTION_MS must be at most 86400000"),
    usageDayRetentionDays: num("LATCHKEY_USAGE_DAY_RETENTION_DAYS").int("LATCHKEY_USAGE_DAY_RETENTION_DAYS must be a whole number").min(0, "LATCHKEY_USAGE_DAY_RETENTION_DAYS must be 0 (keep) or more"),
    cacheMaxEntries: num("LATCHKEY_CACHE_MAX_ENTRIES").int("LATCHKEY_CACHE_MAX_ENTRIES must be a whole number").min(1, "LATCHKEY_CACHE_MAX_ENTRIES must be at least 1"),
    cacheTtlMs: positiveMs("LATCHKEY_CACHE_TTL_MS", 0),
    invalidationPollMs: positiveMs("LATCHKEY_INVALIDATION_POLL_MS", 10).max(500, "LATCHKEY_INVALIDATION_POLL_MS must be at most 500 (revocation within 1 s)"),
    feedStalePolicy: z.enum(["read-through", "not-serving"], { message: "LATCHKEY_FEED_STALE_POLICY must be read-through or not-serving" }),
    ratelimitBackend: z.enum(["", "memory", "mongodb", "redis"], { message: "LATCHKEY_RATELIMIT_BACKEND must be memory, mongodb or redis" }),
    ratelimitLeaseMax: whole("LATCHKEY_RATELIMIT_LEASE_MAX", 0).max(1_000_000_000, "LATCHKEY_RATELIMIT_LEASE_MAX must be at most 1000000000"),
    redisUrl: z.string().refine((v) => v === "" || /^rediss?:\/\//.test(v), "LATCHKEY_REDIS_URL must start with redis:// or rediss://"),
    creditsBackend: z.enum(["", "store", "redis"], { message: "LATCHKEY_CREDITS_BACKEND must be store or redis" }),
    commitMarginMs: num("LATCHKEY_COMMIT_MARGIN_MS").min(0, "LATCHKEY_COMMIT_MARGIN_MS must be 0-1000").max(1000, "LATCHKEY_COMMIT_MARGIN_MS must be 0-1000"),
    creditsFlushMs: positiveMs("LATCHKEY_CREDITS_FLUSH_MS", 50).max(60_000, "LATCHKEY_CREDITS_FLUSH_MS must be at most 60000"),
    creditsLeaseMax: whole("LATCHKEY_CREDITS_LEASE_MAX", 0).max(1_000_000_000, "LATCHKEY_CREDITS_LEASE_MAX must be at most 1000000000"),
    maxMessageBytes: bytes("LATCHKEY_MAX_MESSAGE_BYTES", 1024, 0xffffffff),
    publicMaxMessageBytes: bytes("LATCHKEY_PUBLIC_MAX_MESSAGE_BYTES", 1024, 0xffffffff),
    maxConnections: whole("LATCHKEY_MAX_CONNECTIONS", 1),
    maxConcurrentStreams: whole("LATCHKEY_MAX_CONCURRENT_STREAMS", 1).max(0xffffffff, "LATCHKEY_MAX_CONCURRENT_STREAMS must be at most 4294967295"),
    maxHeaderBytes: bytes("LATCHKEY_MAX_HEADER_BYTES", 1024, 0xffffffff),
    headersTimeoutMs: positiveMs("LATCHKEY_HEADERS_TIMEOUT_MS", 10),
    requestTimeoutMs: positiveMs("LATCHKEY_REQUEST_TIMEOUT_MS", 10),
    idleTimeoutMs: positiveMs("LATCHKEY_IDLE_TIMEOUT_MS", 10),
    maxHealthWatchers: whole("LATCHKEY_MAX_HEALTH_WATCHERS", 0),
  })
  .superRefine((c, ctx) => {
    if ((c.tlsCert === "") !== (c.tlsKey === "")) {
      ctx.addIssue({ code: "custom", message: "LATCHKEY_TLS_CERT and LATCHKEY_TLS_KEY must be set together" });
    }
    if (c.ratelimitBackend === "redis" && c.redisUrl === "") {
      ctx.addIssue({ code: "custom", message: "LATCHKEY_REDIS_URL is required when LATCHKEY_RATELIMIT_BACKEND=redis" });
    }
    if (c.ratelimitBackend === "mongodb" && (c.store || (c.mongodbUri ? "mongodb" : "embedded")) !== "mongodb") {
      ctx.addIssue({ code: "custom", message: "LATCHKEY_RATELIMIT_BACKEND=mongodb needs the mongodb store (MONGODB_URI)" });
    }
    if (c.creditsBackend === "redis" && c.redisUrl === "") {
      ctx.addIssue({ code: "custom", message: "LATCHKEY_REDIS_URL is required when LATCHKEY_CREDITS_BACKEND=redis" });
    }
    if (c.creditsBackend === "redis" && (c.store || (c.mongodbUri ? "mongodb" : "embedded")) !== "mongodb") {
      ctx.addIssue({ code: "custom", message: "LATCHKEY_CREDITS_BACKEND=redis needs the mongodb store (MONGODB_URI)" });
    }
    const creditsBackend = c.creditsBackend || (c.redisUrl && (c.store || (c.mongodbUri ? "mongodb" : "embedded")) === "mongodb" ? "redis" : "store");
    if (c.outageCreditAllowance > 0 && creditsBackend === "redis") {
      ctx.addIssue({ code: "custom", message: "LATCHKEY_OUTAGE_CREDIT_ALLOWANCE applies to the store credits backend only: with the redis backend credits are spent exactly through a store outage; set it to 0 or LATCHKEY_CREDITS_BACKEND=store" });
    }
    if (c.requestTimeoutMs < c.headersTimeoutMs) {
      ctx.addIssue({ code: "custom", message: "LATCHKEY_REQUEST_TIMEOUT_MS must be at least LATCHKEY_HEADERS_TIMEOUT_MS" });
    }
    if (c.store === "mongodb" && c.mongodbUri === "") {
      ctx.addIssue({ code: "custom", message: "MONGODB_URI is required when LATCHKEY_STORE=mongodb" });
    }
  })
  .transform((c) => ({
    ...c,
    store: (c.store || (c.mongodbUri ? "mongodb" : "embedded")) as "embedded" | "mongodb",
    mongodbUri: c.mongodbUri || null,
    tls: c.tlsCert ? { certFile: c.tlsCert, keyFile: c.tlsKey } : null,
    redisUrl: c.redisUrl || null,
    /** "auto": chosen at start by src/app/counters.ts. */
    ratelimitBackend: (c.ratelimitBackend || "auto") as "auto" | "memory" | "mongodb" | "redis",
    creditsBackend: (c.creditsBackend ||
      (c.redisUrl && (c.store || (c.mongodbUri ? "mongodb" : "embedded")) === "mongodb" ? "redis" : "store")) as "store" | "redis",
  }));

export type Config = Readonly<z.infer<typeof schema>>;

export class ConfigError extends Error {}

function flagName(name: string): string {
  return "--" + name.replace(/[A-Z]/g, (c) => "-" + c.toLowerCase());
}

/**
 * Parses flags (`--metrics-port=9000` or `--metrics-port 9000`) over environment
 * variables over defaults into a frozen config. Throws ConfigError naming every
 * bad variable.
 */
export function loadConfig(env: NodeJS.ProcessEnv = process.env, argv: string[] = []): Config {
  const raw: Record<string, string> = {};
  for (const [name, s] of Object.entries(SETTINGS)) raw[name] = env[s.env] ?? s.default;
  const flags = new Map(Object.keys(SETTINGS).map((n) => [flagName(n), n]));
  for (let i = 0; i < argv.length; i++) {
    const [flag, inline] = argv[i].split(/=(.*)/s, 2);
    const name = flags.get(flag);
    if (!name) throw new ConfigError(`unknown flag ${flag}; known flags: ${[...flags.keys()].join(" ")}`);
    const value = inline ?? argv[++i];
    if (value === undefined) throw new ConfigError(`flag ${flag} needs a value`);
    raw[name] = value;
  }
  // Empty is not 0: a variable left blank in a compose file must not bind a random port.
  for (const [name, s] of Object.entries(SETTINGS)) if (/^\d+$/.test(s.default) && raw[name].trim() === "") raw[name] = "NaN";
  const parsed = schema.safeParse(raw);
  if (!parsed.success) {
    throw new ConfigError("invalid configuration: " + parsed.error.issues.map((i) => i.message).join("; "));
  }
  return Object.freeze(parsed.data);
}
