import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from "prom-client";

const WINDOW_S = 60;

/** Cache lookups and hits per second over the last minute, per cache, for the hit ratio gauge. */
export class HitRatioWindow {
  private readonly caches = new Map<string, { sec: Float64Array; hits: Float64Array; total: Float64Array }>();

  record(cache: string, hit: boolean, nowMs: number): void {
    let c = this.caches.get(cache);
    if (!c) {
      c = { sec: new Float64Array(WINDOW_S).fill(-1), hits: new Float64Array(WINDOW_S), total: new Float64Array(WINDOW_S) };
      this.caches.set(cache, c);
    }
    const s = Math.floor(nowMs / 1000);
    const i = s % WINDOW_S;
    if (c.sec[i] !== s) {
      c.sec[i] = s;
      c.hits[i] = 0;
      c.total[i] = 0;
    }
    c.total[i]++;
    if (hit) c.hits[i]++;
  }

  /** Hits ÷ lookups over the last minute per cache (caches without lookups in it are left out). */
  ratios(nowMs: number): Map<string, number> {
    const s = Math.floor(nowMs / 1000);
    const out = new Map<string, number>();
    for (const [name, c] of this.caches) {
      let hits = 0;
      let total = 0;
      for (let i = 0; i < WINDOW_S; i++) {
        if (c.sec[i] > s - WINDOW_S) {
          hits += c.hits[i];
          total += c.total[i];
        }
      }
      if (total > 0) out.set(name, hits / total);
    }
    return out;
  }
}

/** What the change feed reports to the metrics (set by src/cache/invalidation.ts). */
export interface FeedProbe {
  /** Milliseconds since the feed was last read to its end. */
  lagMs(): number;
  /** Whether the feed was read to its end within the revocation bound. */
  fresh(): boolean;
}

/** What the store guard reports to the metrics (src/storage/store-guard.ts). */
export interface StoreProbe {
  reachable(): boolean;
  unreachableForMs(): number;
}

/** A labelled series of a counter, incremented as a plain number (see `fastSeries`). */
export interface FastSeries {
  inc(): void;
}

const fastSeriesOf = new WeakMap<object, { labels: Record<string, string>; n: number }[]>();

/**
 * One labelled series of `counter` counted in a plain number and added to the
 * counter when the metrics are read (the counter's `collect`, `flushFast`):
 * prom-client hashes a labels object on every `inc`, a few µs per
 * verification on the hot path (docs/performance.md). Keep the series (one per
 * label set), not one per call.
 */
export function fastSeries(counter: Counter<string>, labels: Record<string, string>): FastSeries {
  const s = { labels, n: 0 };
  let list = fastSeriesOf.get(counter);
  if (!list) fastSeriesOf.set(counter, (list = []));
  list.push(s);
  return {
    inc() {
      s.n++;
    },
  };
}

/** A counter's `collect`: adds what its fast series counted since the last read. */
function flushFast(this: Counter<string>): void {
  for (const s of fastSeriesOf.get(this) ?? []) {
    if (s.n === 0) continue;
    this.inc(s.labels, s.n);
    s.n = 0;
  }
}

/**
 * A histogram whose series are observed as plain numbers: per label set, a count
 * per bucket, the sum and the count, read out in prom-client's histogram format
 * when the metrics are read. prom-client's own `observe` builds and hashes a
 * labels object per observation, children included (~3 µs per RPC,
 * docs/performance.md). Registered with `registry.registerMetric`.
 */
export class FastHistogram<L extends string> {
  readonly type = "histogram";
  readonly aggregator = "sum";
  readonly name: string;
  readonly help: string;
  private readonly bounds: number[];
  private readonly series = new Map<string, { labels: Record<L, string>; buckets: Float64Array; sum: number; count: number }>();

  constructor(opts: { name: string; help: string; buckets: number[]; registers: Registry[] }) {
    this.name = opts.name;
    this.help = opts.help;
    this.bounds = [...opts.buckets].sort((a, b) => a - b);
    for (const r of opts.registers) r.registerMetric(this as unknown as Parameters<Registry["registerMetric"]>[0]);
  }

  /** The series of one label set (keep it; one per label set, not one per observation). */
  labels(labels: Record<L, string>): { observe(value: number): void } {
    const id = JSON.stringify(Object.keys(labels).sort().map((k) => [k, labels[k as L]]));
    let s = this.series.get(id);
    if (!s) this.series.set(id, (s = { labels: { ...labels }, buckets: new Float64Array(this.bounds.length), sum: 0, count: 0 }));
    const series = s;
    const bounds = this.bounds;
    return {
      observe(value: number) {
        if (!Number.isFinite(value)) return;
        series.sum += value;
        series.count++;
        for (let i = 0; i < bounds.length; i++) {
          if (value <= bounds[i]) {
            series.buckets[i]++;
            return;
          }
        }
      },
    };
  }

  /** As prom-client's Histogram#getForPromString: cumulative buckets, +Inf, sum and count per label set. */
  async getForPromString() {
    const values: { labels: Record<string, string | number>; sharedLabels: Record<string, string>; value: number; metricName: string }[] = [];
    for (const s of this.series.values()) {
      let acc = 0;
      this.bounds.forEach((le, i) => {
        acc += s.buckets[i];
        values.push({ labels: { le }, sharedLabels: s.labels, value: acc, metricName: `${this.name}_bucket` });
      });
      values.push({ labels: { le: "+Inf" }, sharedLabels: s.labels, value: s.count, metricName: `${this.name}_bucket` });
      values.push({ labels: {}, sharedLabels: s.labels, value: s.sum, metricName: `${this.name}_sum` });
      values.push({ labels: {}, sharedLabels: s.labels, value: s.count, metricName: `${this.name}_count` });
    }
    return { name: this.name, help: this.help, type: this.type, values, aggregator: this.aggregator };
  }

  /** As prom-client's Histogram#get (each value's labels with its label set's). */
  async get() {
    const data = await this.getForPromString();
    return { ...data, values: data.values.map(({ labels, sharedLabels, ...v }) => ({ ...v, labels: { ...labels, ...sharedLabels } })) };
  }

  reset(): void {
    for (const s of this.series.values()) {
      s.buckets.fill(0);
      s.sum = 0;
      s.count = 0;
    }
  }
}

/** Prometheus metrics of one server, on their own registry. */
export function createMetrics() {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: "latchkey_process_" });
  const hitWindow = new HitRatioWindow();
  const feed: { probe: FeedProbe | null } = { probe: null };
  const store: { probe: StoreProbe | null } = { probe: null };
  return {
    registry,
    rpcRequests: new Counter({
      name: "latchkey_rpc_requests_total",
      help: "RPCs handled, by method and status code.",
      labelNames: ["method", "code"] as const,
      registers: [registry],
      collect: flushFast,
    }),
    rpcDuration: new FastHistogram<"method" | "code">({
      name: "latchkey_rpc_duration_seconds",
      help: "RPC handling time, by method and status code.",
      buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5],
      registers: [registry],
    }),
    verifications: new Counter({
      name: "latchkey_verifications_total",
      help: "VerifyKey outcomes.",
      labelNames: ["code"] as const,
      registers: [registry],
      collect: flushFast,
    }),
    cacheLookups: new Counter({
      name: "latchkey_cache_lookups_total",
      help: "Verification cache lookups, by cache (key, identity) and result: hit, miss, or bypass (read from the store because the entry has a write in flight or the change feed is behind).",
      labelNames: ["cache", "result"] as const,
      registers: [registry],
      collect: flushFast,
    }),
    cacheStaleAnswers: new Counter({
      name: "latchkey_cache_stale_answers_total",
      help: "Lookups answered from a cache because the store could not be reached (entries at most LATCHKEY_OUTAGE_CACHE_MS old), by cache (key, identity, root_key).",
      labelNames: ["cache"] as const,
      registers: [registry],
    }),
    hitWindow,
    cacheHitRatio: new Gauge({
      name: "latchkey_cache_hit_ratio",
      help: "Share of verification cache lookups over the last minute answered from the cache, by cache (key, identity).",
      labelNames: ["cache"] as const,
      registers: [registry],
      collect() {
        this.reset();
        for (const [cache, r] of hitWindow.ratios(Date.now())) this.set({ cache }, r);
      },
    }),
    /** Set by the change feed when it starts. */
    feed,
    feedLag: new Gauge({
      name: "latchkey_change_feed_lag_seconds",
      help: "Seconds since this instance last read the change feed to its end (revocations older than this have reached its cache).",
      registers: [registry],
      collect() {
        if (feed.probe) this.set(feed.probe.lagMs() / 1000);
      },
    }),
    feedFresh: new Gauge({
      name: "latchkey_change_feed_fresh",
      help: "1 while the change feed was read to its end within the last second (revocation bound), else 0: cached answers are then not used (LATCHKEY_FEED_STALE_POLICY=read-through) or health is NOT_SERVING (not-serving).",
      registers: [registry],
      collect() {
        if (feed.probe) this.set(feed.probe.fresh() ? 1 : 0);
      },
    }),
    feedResyncs: new Counter({
      name: "latchkey_change_feed_resyncs_total",
      help: "Times the verification cache was emptied because change feed entries this instance had not read were missing (pruned while it was behind, or lost).",
      registers: [registry],
    }),
    feedReadErrors: new Counter({
      name: "latchkey_change_feed_read_errors_total",
      help: "Failed reads of the change feed.",
      registers: [registry],
    }),
    /** Set by createCore: the store guard's state. */
    store,
    storeReachable: new Gauge({
      name: "latchkey_store_reachable",
      help: "1 while the store answers; 0 while it cannot be reached (VerifyKey then answers from the cache, health is NOT_SERVING).",
      registers: [registry],
      collect() {
        if (store.probe) this.set(store.probe.reachable() ? 1 : 0);
      },
    }),
    storeUnreachableSeconds: new Gauge({
      name: "latchkey_store_unreachable_seconds",
      help: "Seconds since the store was found unreachable (0 while it answers).",
      registers: [registry],
      collect() {
        if (store.probe) this.set(store.probe.unreachableForMs() / 1000);
      },
    }),
    storeRefused: new Counter({
      name: "latchkey_store_refused_total",
      help: "Store calls refused without being sent because the store could not be reached, by kind (read, write).",
      labelNames: ["op"] as const,
      registers: [registry],
    }),
    outageCreditsAdmitted: new Counter({
      name: "latchkey_outage_credits_admitted_total",
      help: "Credits admitted on trust while the store could not be reached (LATCHKEY_OUTAGE_CREDIT_ALLOWANCE), charged once it answers.",
      registers: [registry],
    }),
    outageCreditsUncharged: new Counter({
      name: "latchkey_outage_credits_uncharged_total",
      help: "Credits admitted on trust during a store outage that could not be charged afterwards (the balance held less, or had become unlimited or was deleted).",
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
