/**
 * The store guard and the caches during an outage, in process and
 * deterministic (issue 13): an instance (createCore, Connect clients over
 * createRouterTransport) over a store whose every call — ping included — can
 * be made to fail as an unreachable store does (StoreUnreachableError), or be
 * held at a gate. The change feed runs on a clock the test moves, so "the
 * cache is N seconds behind" is a step, not a sleep.
 */
import { createClient, createRouterTransport, ConnectError, Code, type Interceptor } from "@connectrpc/connect";
import { Writable } from "node:stream";
import { afterEach, describe, expect, it } from "vitest";
import { HealthCheckResponse_ServingStatus as Serving } from "../../gen/grpc/health/v1/health_pb.js";
import { IdentityService } from "../../gen/latchkey/v1/identity_service_pb.js";
import { KeyService } from "../../gen/latchkey/v1/key_service_pb.js";
import { parseRootPermission } from "../../src/domain/access.js";
import { StoreUnreachableError, UnauthenticatedError, UnavailableError } from "../../src/domain/errors.js";
import { hashKey } from "../../src/domain/key-format.js";
import { createRootKey, createRootKeyAuthenticator } from "../../src/domain/root-keys.js";
import { DEFAULT_CORE_OPTIONS, createCore, type Core, type CoreOptions } from "../../src/app/compose.js";
import { createLogger } from "../../src/observability/logger.js";
import { createMetrics, type Metrics } from "../../src/observability/metrics.js";
import { createStoreGuard } from "../../src/storage/store-guard.js";
import type { Store } from "../../src/storage/store.js";
import { openTestStore, unique, type Clients, type TestStore } from "../support/harness.js";
import { createIdentityWithKeys, createKey, credits, describeEachStore, verify } from "../verify/support.js";

const quietLogger = createLogger("silent", new Writable({ write: (_c, _e, done) => done() }));

/** A held call: resolves `reached` when it arrives, goes on to the store on `release()`. */
interface Held {
  reached: Promise<void>;
  release(): void;
}

/**
 * A store that can go away: while `down`, every call — ping included — fails
 * as an unreachable store's do, without touching the real store. Counts the
 * calls that reached it (per method), and can hold the next call of a method.
 */
function outageStore(real: Store) {
  const state = { down: false };
  const failing = new Set<string>();
  const sent = new Map<string, number>();
  const holds = new Map<string, { reached: () => void; go: Promise<void> }>();
  const store = new Proxy(real, {
    get(target, prop) {
      const v = Reflect.get(target, prop, target) as unknown;
      if (typeof v !== "function") return v;
      const name = String(prop);
      return async (...args: unknown[]) => {
        sent.set(name, (sent.get(name) ?? 0) + 1);
        const hold = holds.get(name);
        if (hold) {
          holds.delete(name);
          hold.reached();
          await hold.go;
        }
        if (state.down || failing.has(name)) throw new StoreUnreachableError("store unreachable (injected)");
        return (v as (...a: unknown[]) => unknown).apply(target, args);
      };
    },
  });
  return {
    store,
    /** Calls per method that reached the store since the last reset. */
    sent,
    down() {
      state.down = true;
    },
    up() {
      state.down = false;
    },
    /** Makes only `method` fail as if the store were unreachable. */
    fail(method: keyof Store) {
      failing.add(method);
    },
    hold(method: keyof Store): Held {
      let reached!: () => void;
      let go!: () => void;
      const r = new Promise<void>((res) => (reached = res));
      holds.set(method, { reached, go: new Promise<void>((res) => (go = res)) });
      return { reached: r, release: () => go() };
    },
  };
}

interface Instance {
  core: Core;
  clients: Clients;
  metrics: Metrics;
  /** Moves the change feed's clock forward. */
  advance(ms: number): void;
}

async function startInstance(store: Store, rootKey: string, options: Partial<CoreOptions> = {}): Promise<Instance> {
  let t = 1_000_000;
  const metrics = createMetrics();
  const core = createCore({ store, logger: quietLogger, metrics, feedClock: () => t, options: { ...DEFAULT_CORE_OPTIONS, rootKeyCacheMs: 0, ...options } });
  await core.start();
  core.feed.stop(); // read when the test says so, on its clock
  await core.health.check();
  const auth: Interceptor = (next) => (req) => {
    req.header.set("authorization", `Bearer ${rootKey}`);
    return next(req);
  };
  const transport = createRouterTransport(core.routes, { router: { interceptors: core.interceptors }, transport: { interceptors: [auth] } });
  return { core, metrics, clients: { identities: createClient(IdentityService, transport), keys: createClient(KeyService, transport) }, advance: (ms) => (t += ms) };
}

/** The call's error code name (fails the test if it succeeded). */
async function codeOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (err) {
    return Code[ConnectError.from(err).code];
  }
  throw new Error("the call succeeded");
}

/** Resolves when the guard reports the store reachable or not as `want` (at once if it does). */
function guardSays(guard: Pick<Core["guard"], "reachable" | "events">, want: boolean): Promise<void> {
  if (guard.reachable() === want) return Promise.resolve();
  return new Promise((resolve) => {
    const on = (up: boolean) => {
      if (up !== want) return;
      guard.events.off("change", on);
      resolve();
    };
    guard.events.on("change", on);
  });
}
const reachableAgain = (core: Core) => guardSays(core.guard, true);

/** Resolves when health reports `want` (at once if it does). */
function healthSays(core: Core, want: Serving): Promise<void> {
  return new Promise((resolve) => {
    const on = () => {
      if (core.health.current !== want) return;
      core.health.events.off("change", on);
      resolve();
    };
    core.health.events.on("change", on);
    on();
  });
}

async function metricValue(m: Metrics, name: string, labels: Record<string, string> = {}): Promise<number> {
  const metric = m.registry.getSingleMetric(name);
  if (!metric) return NaN;
  const { values } = await metric.get();
  return values.find((v) => Object.entries(labels).every(([k, l]) => v.labels[k] === l))?.value ?? 0;
}

/** Methods that reached the store, but the probe's pings. */
const calls = (sent: Map<string, number>) => [...sent.keys()].filter((m) => m !== "ping");

const disable = (c: Clients, id: string) => c.keys.updateKey({ key: { id, enabled: false }, updateMask: { paths: ["enabled"] } });

describeEachStore("verification while the store cannot be reached", (kind) => {
  let ts: TestStore | undefined;
  const instances: Instance[] = [];
  let outage!: ReturnType<typeof outageStore>;
  let rootKey = "";

  async function instance(options: Partial<CoreOptions> = {}): Promise<Instance> {
    ts ??= await openTestStore(kind);
    rootKey ||= (await createRootKey(ts.store, "test", parseRootPermission("*")))!.plaintext;
    outage = outageStore(ts.store);
    const i = await startInstance(outage.store, rootKey, options);
    instances.push(i);
    return i;
  }

  /** Takes the store away and lets the guard find out (a probe that fails). */
  async function storeGoes(i: Instance): Promise<void> {
    outage.down();
    await i.core.guard.probe().catch(() => undefined);
    expect(i.core.guard.reachable()).toBe(false);
    outage.sent.clear();
  }

  afterEach(async () => {
    outage?.up();
    for (const i of instances.splice(0)) {
      await reachableAgain(i.core);
      await i.core.stop();
    }
    await ts?.destroy();
    ts = undefined;
    rootKey = "";
  });

  it("answers cached keys and identities, past their TTL and the root key's cache time, without a store call", async () => {
    const a = await instance({ cacheTtlMs: 1 });
    const { keys } = await createIdentityWithKeys(a.clients, 1, { externalId: unique("org"), meta: { plan: "pro" } });
    expect((await verify(a.clients, keys[0])).codeName).toBe("VALID");

    await storeGoes(a);
    a.advance(5000); // the feed is behind as well (read-through would go to the store)
    const res = await verify(a.clients, keys[0]);
    expect(res.codeName).toBe("VALID");
    expect(res.identity?.meta).toEqual({ plan: "pro" });
    expect(calls(outage.sent), "no store call but the probe's pings").toEqual([]);
    expect(await metricValue(a.metrics, "latchkey_cache_stale_answers_total", { cache: "key" })).toBe(1);
    expect(await metricValue(a.metrics, "latchkey_cache_stale_answers_total", { cache: "root_key" })).toBe(1);
    expect(await metricValue(a.metrics, "latchkey_store_reachable")).toBe(0);
    expect(a.core.health.current).toBe(Serving.NOT_SERVING);
  });

  it("refuses an uncached key and every write with UNAVAILABLE, sending nothing to the store", async () => {
    const a = await instance();
    const cached = await createKey(a.clients);
    const uncached = await createKey(a.clients);
    await verify(a.clients, cached.plaintext);
    await storeGoes(a);

    expect(await codeOf(verify(a.clients, uncached.plaintext))).toBe("Unavailable");
    const write = a.clients.keys.createKey({ apiId: "api_verify", name: "during" });
    expect(await codeOf(write)).toBe("Unavailable");
    expect(String(await write.catch((e: Error) => e.message))).toMatch(/nothing was written/);
    expect(await codeOf(disable(a.clients, cached.id))).toBe("Unavailable");
    expect(calls(outage.sent), "no store call but the probe's pings").toEqual([]);
    expect(await metricValue(a.metrics, "latchkey_store_refused_total", { op: "write" })).toBeGreaterThan(0);
    expect(await metricValue(a.metrics, "latchkey_store_refused_total", { op: "read" })).toBeGreaterThan(0);

    outage.up();
    await reachableAgain(a.core);
    const names = (await a.clients.keys.listKeys({ apiId: "api_verify" })).keys.map((k) => k.name);
    expect(names).not.toContain("during");
    expect((await verify(a.clients, cached.plaintext)).codeName, "the disable was not written").toBe("VALID");
  });

  it("refuses a spend of credits kept in the store, and gives its rate-limit tokens back", async () => {
    const a = await instance();
    const { identityId, keys } = await createIdentityWithKeys(a.clients, 1, {
      externalId: unique("org"),
      credits: credits(10),
      ratelimits: [{ name: "requests", limit: 5n, duration: { seconds: 3600n }, autoApply: true }],
    });
    expect((await verify(a.clients, keys[0])).codeName).toBe("VALID");
    await storeGoes(a);
    expect(await codeOf(verify(a.clients, keys[0]))).toBe("Unavailable");

    outage.up();
    await reachableAgain(a.core);
    const res = await verify(a.clients, keys[0]);
    expect(res.codeName).toBe("VALID");
    expect(res.creditsRemaining).toBe(8n);
    expect(res.ratelimits[0].remaining, "the refused call's token came back").toBe(3n);
    expect((await a.clients.identities.getIdentity({ lookup: { case: "id", value: identityId } })).identity?.credits?.remaining).toBe(8n);
  });

  it("once the store is back, answers from the cache until the change feed is read (for at most 2 s), instead of sending every verification to the store", async () => {
    const a = await instance();
    const k = await createKey(a.clients);
    expect((await verify(a.clients, k.plaintext)).codeName).toBe("VALID");
    await storeGoes(a);
    a.advance(5000); // the feed is behind: read-through, were the store reachable
    const read = outage.hold("changesSince"); // the feed's first read once the store is back
    outage.up();
    await reachableAgain(a.core);
    await read.reached;
    outage.sent.clear();
    expect((await verify(a.clients, k.plaintext)).codeName).toBe("VALID");
    expect(outage.sent.get("getKeyByHash") ?? 0, "answered from the cache while the feed is read").toBe(0);
    // The feed not read 2 s after the store came back: read-through again.
    a.advance(2000);
    expect((await verify(a.clients, k.plaintext)).codeName).toBe("VALID");
    expect(outage.sent.get("getKeyByHash") ?? 0, "read through to the store").toBe(1);
    read.release();
  });

  it("stops answering from the cache once it is older than LATCHKEY_OUTAGE_CACHE_MS", async () => {
    const a = await instance({ outageCacheMs: 60_000 });
    const k = await createKey(a.clients);
    await verify(a.clients, k.plaintext);
    await a.core.feed.sync();
    await storeGoes(a);
    a.advance(60_000);
    expect((await verify(a.clients, k.plaintext)).codeName, "as old as allowed").toBe("VALID");
    a.advance(1);
    expect(await codeOf(verify(a.clients, k.plaintext))).toBe("Unavailable");
  });

  it("never answers from the cache when LATCHKEY_OUTAGE_CACHE_MS is 0", async () => {
    const a = await instance({ outageCacheMs: 0 });
    const k = await createKey(a.clients);
    await verify(a.clients, k.plaintext);
    await storeGoes(a);
    a.advance(2000);
    expect(await codeOf(verify(a.clients, k.plaintext))).toBe("Unavailable");
  });

  it("does not answer from the cache an entry with a write in flight", async () => {
    const a = await instance();
    const k = await createKey(a.clients);
    await verify(a.clients, k.plaintext);
    a.core.cache.pinKey(hashKey(k.plaintext));
    await storeGoes(a);
    expect(await codeOf(verify(a.clients, k.plaintext))).toBe("Unavailable");
  });

  it("keeps the revocation promise while the store answers: a key disabled elsewhere is DISABLED even when the feed cannot be read", async () => {
    const a = await instance();
    const b = await instance();
    const k = await createKey(a.clients);
    await b.core.feed.sync();
    expect((await verify(b.clients, k.plaintext)).codeName).toBe("VALID");
    await disable(a.clients, k.id);
    // B's feed reads fail as if the store were gone, but the store answers everything else (its ping too).
    outage.fail("changesSince");
    await b.core.feed.sync();
    b.advance(1001);
    expect((await verify(b.clients, k.plaintext)).codeName, "read through to the store").toBe("DISABLED");
    expect(b.core.guard.reachable()).toBe(true);
  });

  it("releases reads in flight with UNAVAILABLE when the store turns unreachable, and leaves writes in flight to the store's answer", async () => {
    const a = await instance({ outageCacheMs: 0 });
    const k = await createKey(a.clients);
    const read = outage.hold("getKeyByHash");
    const verifying = verify(a.clients, k.plaintext);
    await read.reached;
    const write = outage.hold("createKey");
    const creating = a.clients.keys.createKey({ apiId: "api_verify", name: "in flight" });
    await write.reached;

    // The store stops answering: a ping fails, the guard trips.
    outage.down();
    await a.core.guard.probe().catch(() => undefined);
    expect(await codeOf(verifying)).toBe("Unavailable");
    // The write was already sent: its outcome is the store's, here that it landed.
    let settled = false;
    void creating.finally(() => (settled = true)).catch(() => undefined);
    await new Promise((r) => setImmediate(r));
    expect(settled).toBe(false);
    outage.up();
    write.release();
    expect((await creating).key?.name).toBe("in flight");
    read.release();
  });
});

describe("the store guard", () => {
  let ts: TestStore | undefined;
  afterEach(async () => {
    await ts?.destroy();
    ts = undefined;
  });

  it("turns health NOT_SERVING when a ping does not answer within its timeout, and SERVING once a probe answers", async () => {
    ts = await openTestStore("embedded");
    const outage = outageStore(ts.store);
    const metrics = createMetrics();
    const core = createCore({ store: outage.store, logger: quietLogger, metrics, options: { ...DEFAULT_CORE_OPTIONS, storeProbeTimeoutMs: 50 } });
    try {
      await core.health.check();
      expect(core.health.current).toBe(Serving.SERVING);
      const ping = outage.hold("ping");
      const checking = core.health.check();
      await ping.reached;
      await checking;
      expect(core.health.current, "no answer within the probe timeout").toBe(Serving.NOT_SERVING);
      expect(core.guard.reachable()).toBe(false);
      // Probes go on until one answers; health follows at once.
      ping.release();
      await reachableAgain(core);
      await new Promise<void>((resolve) => (core.health.current === Serving.SERVING ? resolve() : core.health.events.once("change", () => resolve())));
      expect(core.health.current).toBe(Serving.SERVING);
    } finally {
      await core.stop();
    }
  });

  it("finds the store unreachable from a failed call, and refuses calls without sending them until it answers again", async () => {
    ts = await openTestStore("embedded");
    const outage = outageStore(ts.store);
    const guard = createStoreGuard(outage.store, { probeTimeoutMs: 1000, failFastMs: 0 });
    try {
      outage.down();
      await expect(guard.store.getKey("key_x")).rejects.toBeInstanceOf(StoreUnreachableError);
      // The failed call started a probe, which fails too.
      await guardSays(guard, false);
      outage.sent.clear();
      await expect(guard.store.getKey("key_x")).rejects.toThrow(/unreachable/);
      await expect(guard.store.deleteKey("key_x")).rejects.toThrow(/nothing was written/);
      expect(outage.sent.get("getKey") ?? 0).toBe(0);
      expect(outage.sent.get("deleteKey") ?? 0).toBe(0);
      outage.up();
      await guardSays(guard, true);
      expect(await guard.store.getKey("key_x")).toBeNull();
    } finally {
      guard.stop();
    }
  });

  it("probes the store when a read of the change feed hangs, and turns NOT_SERVING without waiting for a health check", async () => {
    // A store that stops answering (a hung server, a lost network) raises no error: the feed's read just hangs.
    // No health check runs here (createCore starts none): only the feed's hanging read can set off the probe.
    ts = await openTestStore("embedded");
    const outage = outageStore(ts.store);
    const core = createCore({ store: outage.store, logger: quietLogger, metrics: createMetrics(), options: { ...DEFAULT_CORE_OPTIONS, invalidationPollMs: 50 } });
    await core.start();
    try {
      await core.health.check();
      expect(core.health.current).toBe(Serving.SERVING);
      const read = outage.hold("changesSince");
      await read.reached;
      outage.down();
      outage.sent.clear();
      await guardSays(core.guard, false);
      expect(outage.sent.get("ping"), "the guard pinged the store").toBeGreaterThan(0);
      await healthSays(core, Serving.NOT_SERVING);
      outage.up();
      read.release();
      await reachableAgain(core);
      await healthSays(core, Serving.SERVING);
    } finally {
      await core.stop();
    }
  });

  it("lets a call waiting within LATCHKEY_STORE_FAIL_FAST_MS through when the store comes back meanwhile", async () => {
    ts = await openTestStore("embedded");
    const outage = outageStore(ts.store);
    const guard = createStoreGuard(outage.store, { probeTimeoutMs: 1000, failFastMs: 60_000 });
    try {
      outage.down();
      await guard.probe().catch(() => undefined);
      expect(guard.reachable()).toBe(false);
      const waiting = guard.store.getKey("key_x");
      outage.up();
      expect(await waiting).toBeNull();
    } finally {
      guard.stop();
    }
  });

  it("does not probe on contention (a busy lock is not an outage)", async () => {
    ts = await openTestStore("embedded");
    const real = ts.store;
    let pings = 0;
    const busy = new Proxy(real, {
      get(target, prop) {
        if (prop === "getKey") return async () => Promise.reject(new UnavailableError("busy: retry"));
        if (prop === "ping") {
          return async () => {
            pings++;
          };
        }
        const v = Reflect.get(target, prop, target) as unknown;
        return typeof v === "function" ? v.bind(target) : v;
      },
    });
    const guard = createStoreGuard(busy, { probeTimeoutMs: 1000, failFastMs: 0 });
    try {
      await expect(guard.store.getKey("key_x")).rejects.toThrow(/busy/);
      await new Promise((r) => setImmediate(r));
      expect(pings).toBe(0);
      expect(guard.reachable()).toBe(true);
    } finally {
      guard.stop();
    }
  });
});

describe("root keys while the store cannot be reached", () => {
  let ts: TestStore | undefined;
  afterEach(async () => {
    await ts?.destroy();
    ts = undefined;
  });

  it("keeps a root key checked before the outage working for LATCHKEY_OUTAGE_CACHE_MS, and checks it again once the store answers", async () => {
    ts = await openTestStore("embedded");
    const outage = outageStore(ts.store);
    let clock = 1_000_000;
    let stale = 0;
    const auth = createRootKeyAuthenticator({ store: outage.store, cacheMs: 5000, now: () => clock, outageMs: 60_000, onStaleAnswer: () => stale++ });
    const root = (await createRootKey(ts.store, "t", parseRootPermission("*")))!;
    const header = `Bearer ${root.plaintext}`;
    expect((await auth(header)).rootKeyId).toBe(root.record.id);

    outage.down();
    // Revoked meanwhile by whoever can reach the store: this instance cannot know.
    await ts.store.deleteRootKey(root.record.id);
    clock += 60_000;
    expect((await auth(header)).rootKeyId, "checked 60 s ago").toBe(root.record.id);
    expect(stale).toBe(1);
    clock += 1;
    await expect(auth(header)).rejects.toBeInstanceOf(StoreUnreachableError);

    outage.up();
    await expect(auth(header)).rejects.toBeInstanceOf(UnauthenticatedError);
  });

  it("refuses a root key it never saw valid with UNAVAILABLE, not UNAUTHENTICATED", async () => {
    ts = await openTestStore("embedded");
    const outage = outageStore(ts.store);
    const auth = createRootKeyAuthenticator({ store: outage.store, cacheMs: 5000, outageMs: 60_000 });
    const root = (await createRootKey(ts.store, "t", parseRootPermission("*")))!;
    outage.down();
    await expect(auth(`Bearer ${root.plaintext}`)).rejects.toBeInstanceOf(StoreUnreachableError);
  });
});
