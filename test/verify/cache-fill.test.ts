/**
 * The verification cache fills while unrelated keys change (issue 10, item 1):
 * an eviction of one entry discards only a store read of that entry, never
 * every read in flight. Verifications of cached keys then do no store I/O
 * (counted through a store wrapper) and the cache hit ratio metric says so.
 * Instances are createCore over a wrapped store, with Connect clients over
 * createRouterTransport; a second core on the same store plays another instance.
 */
import { Writable } from "node:stream";
import { afterEach, expect, it } from "vitest";
import { createClient, createRouterTransport, type Interceptor } from "@connectrpc/connect";
import { IdentityService } from "../../gen/latchkey/v1/identity_service_pb.js";
import { KeyService } from "../../gen/latchkey/v1/key_service_pb.js";
import { parseRootPermission } from "../../src/domain/access.js";
import { createRootKey } from "../../src/domain/root-keys.js";
import { DEFAULT_CORE_OPTIONS, createCore, type Core } from "../../src/app/compose.js";
import { createLogger } from "../../src/observability/logger.js";
import { createMetrics, type Metrics } from "../../src/observability/metrics.js";
import type { Store } from "../../src/storage/store.js";
import { openTestStore, unique, type Clients, type TestStore } from "../support/harness.js";
import { createIdentityWithKeys, createKey, describeEachStore, verify } from "./support.js";

const quietLogger = createLogger("warn", new Writable({ write: (_c, _e, done) => done() }));

interface Instance {
  core: Core;
  clients: Clients;
  metrics: Metrics;
}

async function startInstance(store: Store, rootKey: string): Promise<Instance> {
  const metrics = createMetrics();
  const core = createCore({ store, logger: quietLogger, metrics, options: { ...DEFAULT_CORE_OPTIONS, rootKeyCacheMs: 60_000 } });
  await core.start();
  const auth: Interceptor = (next) => (req) => {
    req.header.set("authorization", `Bearer ${rootKey}`);
    return next(req);
  };
  const transport = createRouterTransport(core.routes, { router: { interceptors: core.interceptors }, transport: { interceptors: [auth] } });
  return { core, metrics, clients: { identities: createClient(IdentityService, transport), keys: createClient(KeyService, transport) } };
}

/** The value of one sample of a metric, by its labels (0 when absent). */
async function sample(m: Metrics, name: string, labels: Record<string, string>): Promise<number> {
  const metric = m.registry.getSingleMetric(name);
  if (!metric) throw new Error(`no metric ${name}`);
  const { values } = await metric.get();
  const hit = values.find((v) => Object.entries(labels).every(([k, l]) => v.labels[k] === l));
  return hit?.value ?? 0;
}

const lookups = async (m: Metrics) => ({
  hit: await sample(m, "latchkey_cache_lookups_total", { cache: "key", result: "hit" }),
  miss: await sample(m, "latchkey_cache_lookups_total", { cache: "key", result: "miss" }),
});

describeEachStore("the verification cache fills under a stream of unrelated writes", (kind) => {
  let ts: TestStore | undefined;
  const instances: Instance[] = [];

  afterEach(async () => {
    for (const i of instances.splice(0)) await i.core.stop();
    await ts?.destroy();
    ts = undefined;
  });

  it("caches a key whose store read was in flight while another key changed, and verifies it again without a store read", async () => {
    ts = await openTestStore(kind);
    const real = ts.store;
    const root = (await createRootKey(real, "test", parseRootPermission("*")))!.plaintext;
    const unrelated = await createKeyDirect(real);
    let a!: Instance;
    let byHash = 0;
    // Every read of a key by hash returns only after an unrelated key was
    // changed and this instance's change feed evicted it: each fill is in
    // flight across an eviction of another entry.
    const busy = new Proxy(real, {
      get(target, prop, receiver) {
        if (prop !== "getKeyByHash") return Reflect.get(target, prop, receiver);
        return async (hash: string) => {
          byHash++;
          const rec = await target.getKeyByHash(hash);
          await target.updateKey(unrelated, { name: unique("n") }, Date.now());
          await a.core.feed.sync();
          return rec;
        };
      },
    });
    a = await startInstance(busy, root);
    instances.push(a);
    const keys: string[] = [];
    for (let i = 0; i < 5; i++) keys.push((await createKey(a.clients)).plaintext);
    a.core.cache.clear();

    for (const k of keys) expect((await verify(a.clients, k)).codeName).toBe("VALID");
    expect(byHash, "one store read per key").toBe(keys.length);

    const before = await lookups(a.metrics);
    for (let round = 0; round < 3; round++) for (const k of keys) expect((await verify(a.clients, k)).codeName).toBe("VALID");
    expect(byHash, "no store read once cached").toBe(keys.length);
    const after = await lookups(a.metrics);
    expect({ hit: after.hit - before.hit, miss: after.miss - before.miss }).toEqual({ hit: 3 * keys.length, miss: 0 });
    // The ratio over the last minute: 15 hits after 5 misses.
    expect(await sample(a.metrics, "latchkey_cache_hit_ratio", { cache: "key" })).toBeCloseTo(15 / 20, 6);
  });

  it("serves cached keys and identities with no store I/O while another instance keeps writing", async () => {
    ts = await openTestStore(kind);
    const root = (await createRootKey(ts.store, "test", parseRootPermission("*")))!.plaintext;
    const counted = new Map<string, number>();
    const counting = new Proxy(ts.store, {
      get(target, prop, receiver) {
        const v = Reflect.get(target, prop, receiver);
        if (typeof v !== "function") return v;
        return (...args: unknown[]) => {
          counted.set(String(prop), (counted.get(String(prop)) ?? 0) + 1);
          return (v as (...a: unknown[]) => unknown).apply(target, args);
        };
      },
    });
    const a = await startInstance(counting, root);
    const b = await startInstance(ts.store, root);
    instances.push(a, b);
    const { keys } = await createIdentityWithKeys(b.clients, 10, { externalId: unique("org") });
    const other = await createKey(b.clients);
    // A has read the creations (which evict what they name) before it caches anything.
    await a.core.feed.sync();

    let writing = true;
    let writes = 0;
    const writer = (async () => {
      while (writing) {
        await b.clients.keys.updateKey({ key: { id: other.id, name: unique("n") }, updateMask: { paths: ["name"] } });
        writes++;
      }
    })();
    try {
      // Warm: one pass while the writes go on, then wait until B has written some more.
      for (const k of keys) expect((await verify(a.clients, k)).codeName).toBe("VALID");
      const seen = writes;
      while (writes < seen + 3) await a.core.feed.sync();
      const reads = () => (counted.get("getKeyByHash") ?? 0) + (counted.get("getIdentity") ?? 0);
      const before = reads();
      for (let round = 0; round < 3; round++) {
        for (const k of keys) expect((await verify(a.clients, k)).codeName).toBe("VALID");
        await a.core.feed.sync();
      }
      expect(reads() - before, "store reads for cached keys and their identity").toBe(0);
    } finally {
      writing = false;
      await writer;
    }
    expect(writes).toBeGreaterThan(3);
  });
});

/** A key written straight to the store (not through an instance). */
async function createKeyDirect(store: Store): Promise<string> {
  const { keyRecord } = await import("../support/records.js");
  const { record } = keyRecord();
  await store.createKey(record);
  return record.id;
}
