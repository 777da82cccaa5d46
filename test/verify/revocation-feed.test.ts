/**
 * Revocation within one second on every instance, or an explicit answer
 * (issue 9, item 2): what an instance does when it cannot read the change
 * feed, when a change it has not read is gone, when a write is cut off between
 * its data and the rest, and with a backlog behind a gap.
 *
 * Instances are createCore over (gated) stores, with Connect clients over
 * createRouterTransport; instance B's change feed runs on a clock the test
 * moves, so "more than 1 second without reading the feed" is a step, not a
 * sleep. A second core on the same store plays the other instance.
 */
import { Writable } from "node:stream";
import { afterEach, expect, it } from "vitest";
import { createClient, createRouterTransport, type Interceptor } from "@connectrpc/connect";
import { HealthCheckResponse_ServingStatus as Serving } from "../../gen/grpc/health/v1/health_pb.js";
import { IdentityService } from "../../gen/latchkey/v1/identity_service_pb.js";
import { KeyService } from "../../gen/latchkey/v1/key_service_pb.js";
import { parseRootPermission } from "../../src/domain/access.js";
import { createRootKey } from "../../src/domain/root-keys.js";
import { UnavailableError } from "../../src/domain/errors.js";
import { DEFAULT_CORE_OPTIONS, createCore, type Core, type CoreOptions } from "../../src/app/compose.js";
import { createLogger } from "../../src/observability/logger.js";
import { createMetrics, type Metrics } from "../../src/observability/metrics.js";
import type { MongoStore } from "../../src/storage/mongodb/mongo-store.js";
import type { Store } from "../../src/storage/store.js";
import { openTestStore, randomDatabaseName, unique, type Clients, type TestStore } from "../support/harness.js";
import { deleteChange, gatedStore, severAfter, type GatedStore } from "./store-gates.js";
import { createIdentityWithKeys, createKey, credits, describeEachStore, describeWith, mongodbUri, verify } from "./support.js";

const quietLogger = createLogger("silent", new Writable({ write: (_c, _e, done) => done() }));

interface Instance {
  core: Core;
  clients: Clients;
  metrics: Metrics;
  /** Moves this instance's change-feed clock forward. */
  advance(ms: number): void;
}

async function startInstance(store: Store, rootKey: string, options: Partial<CoreOptions> = {}): Promise<Instance> {
  let t = 1_000_000;
  const metrics = createMetrics();
  const core = createCore({
    store,
    logger: quietLogger,
    metrics,
    feedClock: () => t,
    options: { ...DEFAULT_CORE_OPTIONS, rootKeyCacheMs: 60_000, ...options },
  });
  await core.start();
  // No timers: the feed is read when the test calls feed.sync(), on the test's clock.
  core.feed.stop();
  const auth: Interceptor = (next) => (req) => {
    req.header.set("authorization", `Bearer ${rootKey}`);
    return next(req);
  };
  const transport = createRouterTransport(core.routes, { router: { interceptors: core.interceptors }, transport: { interceptors: [auth] } });
  return {
    core,
    metrics,
    clients: { identities: createClient(IdentityService, transport), keys: createClient(KeyService, transport) },
    advance: (ms) => (t += ms),
  };
}

async function gauge(m: Metrics, name: string, labels: Record<string, string> = {}): Promise<number | undefined> {
  const metric = m.registry.getSingleMetric(name);
  if (!metric) return undefined;
  const { values } = await metric.get();
  return values.find((v) => Object.entries(labels).every(([k, l]) => v.labels[k] === l))?.value ?? 0;
}

/** Resolves when the instance's health turns `want` (at once if it is); fails if it has not within 5 s. */
function healthTurns(core: Core, want: Serving): Promise<void> {
  if (core.health.current === want) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`health did not turn ${Serving[want]}; it is ${Serving[core.health.current]}`)), 5000);
    const on = (s: Serving) => {
      if (s !== want) return;
      core.health.events.off("change", on);
      clearTimeout(timer);
      resolve();
    };
    core.health.events.on("change", on);
  });
}

const disable = (c: Clients, id: string) => c.keys.updateKey({ key: { id, enabled: false }, updateMask: { paths: ["enabled"] } });
const feedDown = () => new UnavailableError("store unreachable (injected)");

describeEachStore("revocation when the change feed is behind", (kind) => {
  let ts: TestStore | undefined;
  const instances: Instance[] = [];
  let gated!: GatedStore;

  /** A (over the store) and B (over a gated store, its feed on a test clock). */
  async function pair(bOptions: Partial<CoreOptions> = {}): Promise<[Instance, Instance]> {
    ts = await openTestStore(kind);
    const root = (await createRootKey(ts.store, "test", parseRootPermission("*")))!.plaintext;
    gated = gatedStore(ts.store);
    const a = await startInstance(ts.store, root);
    const b = await startInstance(gated.store, root, bOptions);
    instances.push(a, b);
    return [a, b];
  }

  afterEach(async () => {
    for (const i of instances.splice(0)) await i.core.stop();
    await ts?.destroy();
    ts = undefined;
  });

  it("verifies against the store, not the cache, once it has not read the feed for over 1 second (read-through, the default)", async () => {
    const [a, b] = await pair();
    const k = await createKey(a.clients, { credits: credits(100) });
    await b.core.feed.sync();
    expect((await verify(b.clients, k.plaintext)).codeName, "cached on B").toBe("VALID");

    const restore = gated.failAll("changesSince", feedDown);
    await disable(a.clients, k.id);
    await b.core.feed.sync();
    b.advance(999);
    expect(await gauge(b.metrics, "latchkey_change_feed_fresh"), "within the bound").not.toBe(0);
    b.advance(2);
    gated.reset();
    expect((await verify(b.clients, k.plaintext)).codeName, "read through to the store").toBe("DISABLED");
    expect(gated.calls.get("getKeyByHash")).toBe(1);
    expect(await gauge(b.metrics, "latchkey_change_feed_fresh")).toBe(0);
    expect(await gauge(b.metrics, "latchkey_change_feed_lag_seconds")).toBeGreaterThan(1);

    // Once the feed is read again, the cache is used again.
    restore();
    await b.core.feed.sync();
    expect(await gauge(b.metrics, "latchkey_change_feed_fresh")).toBe(1);
    await verify(b.clients, k.plaintext);
    gated.reset();
    expect((await verify(b.clients, k.plaintext)).codeName).toBe("DISABLED");
    expect(gated.calls.get("getKeyByHash") ?? 0, "a cache hit").toBe(0);
  });

  it("reports NOT_SERVING through health while it has not read the feed for over 1 second (not-serving), and SERVING once it has", async () => {
    const [a, b] = await pair({ feedStalePolicy: "not-serving" });
    await b.core.health.check();
    expect(b.core.health.current).toBe(Serving.SERVING);
    const k = await createKey(a.clients);
    await b.core.feed.sync();
    expect((await verify(b.clients, k.plaintext)).codeName).toBe("VALID");

    const restore = gated.failAll("changesSince", feedDown);
    await b.core.feed.sync();
    b.advance(1001);
    await b.core.feed.sync();
    await healthTurns(b.core, Serving.NOT_SERVING);
    expect(await gauge(b.metrics, "latchkey_change_feed_fresh")).toBe(0);
    // The cache still answers (a load balancer that honours health has moved the traffic away).
    gated.reset();
    expect((await verify(b.clients, k.plaintext)).codeName).toBe("VALID");
    expect(gated.calls.get("getKeyByHash") ?? 0).toBe(0);

    restore();
    await b.core.feed.sync();
    await healthTurns(b.core, Serving.SERVING);
    expect(await gauge(b.metrics, "latchkey_change_feed_fresh")).toBe(1);
  });

  it("empties its cache when changes it has not read were pruned while it was behind, and answers DISABLED", async () => {
    const [a, b] = await pair({ feedStalePolicy: "not-serving" });
    const k = await createKey(a.clients);
    const other = await createKey(a.clients);
    await b.core.feed.sync();
    expect((await verify(b.clients, k.plaintext)).codeName).toBe("VALID");

    // B cannot read the feed for a while; the disable is written and then pruned away.
    const restore = gated.failAll("changesSince", feedDown);
    await disable(a.clients, k.id);
    await a.clients.keys.updateKey({ key: { id: other.id, name: "x" }, updateMask: { paths: ["name"] } });
    // Pruned: every entry but the newest is gone (the store prunes whole batches of entries; these go one by one).
    const newest = await ts!.store.lastChangeSeq();
    for (const c of await ts!.store.changesSince(0, 10_000, { pastGaps: true })) if (c.seq < newest) await deleteChange(kind, ts!.store, c.seq);
    b.advance(60_000);
    restore();
    await b.core.feed.sync();
    expect((await verify(b.clients, k.plaintext)).codeName).toBe("DISABLED");
    expect(await gauge(b.metrics, "latchkey_change_feed_resyncs_total")).toBe(1);
  });

  it("reads a backlog of over 1,000 changes behind a gap once, empties its cache once, and answers DISABLED", async () => {
    const [a, b] = await pair();
    const k = await createKey(a.clients);
    const other = await createKey(a.clients);
    await b.core.feed.sync();
    expect((await verify(b.clients, k.plaintext)).codeName).toBe("VALID");

    // The disable's change is lost (a gap), and 1,100 changes follow it.
    const before = await ts!.store.lastChangeSeq();
    await disable(a.clients, k.id);
    await ts!.store.updateKey(other.id, { name: "first" }, Date.now());
    for (const c of await ts!.store.changesSince(before, 100)) {
      // (`id`: the change entries of earlier versions, to show how their reader fares.)
      const names = c.keys ? c.keys.map((x) => x.id) : [(c as unknown as { id: string }).id];
      if (names.includes(k.id)) await deleteChange(kind, ts!.store, c.seq);
    }
    // 1,100 entries (on MongoDB each write is an intent and a done).
    for (let i = 0; i < (kind === "embedded" ? 1100 : 550); i++) await ts!.store.updateKey(other.id, { name: `n${i}` }, Date.now());
    gated.reset();
    b.advance(5001);
    await b.core.feed.sync();
    // Pages of 500 (and the one that finds the end): not the same page again and again.
    expect(gated.calls.get("changesSince")).toBeLessThanOrEqual(kind === "embedded" ? 4 : 6);
    expect((await verify(b.clients, k.plaintext)).codeName).toBe("DISABLED");
    expect(b.core.feed.state().cursor).toBe(await ts!.store.lastChangeSeq());
    expect(await gauge(b.metrics, "latchkey_change_feed_resyncs_total")).toBe(1);
  }, 120_000);

  // (On MongoDB 6,000 writes through the store take minutes on FerretDB; the reader's logic is the same.)
  it.runIf(kind === "embedded")("skips a backlog of over 5,000 changes: empties its cache once, and caches nothing while a missed write may still land", async () => {
    const [a, b] = await pair();
    const k = await createKey(a.clients);
    const other = await createKey(a.clients);
    await b.core.feed.sync();
    expect((await verify(b.clients, k.plaintext)).codeName).toBe("VALID");

    await disable(a.clients, k.id);
    for (let i = 0; i < 6000; i++) await ts!.store.updateKey(other.id, { name: `n${i}` }, Date.now());
    gated.reset();
    await b.core.feed.sync();
    expect(gated.calls.get("changesSince"), "one page, then on from the newest").toBeLessThanOrEqual(3);
    expect(await gauge(b.metrics, "latchkey_change_feed_resyncs_total")).toBe(1);
    expect(b.core.feed.state().cursor).toBe(await ts!.store.lastChangeSeq());

    gated.reset();
    expect((await verify(b.clients, k.plaintext)).codeName).toBe("DISABLED");
    expect((await verify(b.clients, k.plaintext)).codeName).toBe("DISABLED");
    expect(gated.calls.get("getKeyByHash"), "read from the store, not cached, for the intents' bound").toBe(2);
    b.advance(5000);
    await b.core.feed.sync();
    await verify(b.clients, k.plaintext);
    gated.reset();
    expect((await verify(b.clients, k.plaintext)).codeName).toBe("DISABLED");
    expect(gated.calls.get("getKeyByHash") ?? 0, "cached again").toBe(0);
  });

  it("revokes every key of an identity deleted with its keys after one read of the feed", async () => {
    const [a, b] = await pair();
    const { identityId, keys } = await createIdentityWithKeys(a.clients, 30, { externalId: unique("org") });
    await b.core.feed.sync();
    for (const k of keys) expect((await verify(b.clients, k)).codeName).toBe("VALID");
    await a.clients.identities.deleteIdentity({ lookup: { case: "id", value: identityId }, deleteKeys: true });
    gated.reset();
    await b.core.feed.sync();
    expect(gated.calls.get("changesSince"), "one read (and one that finds the end)").toBeLessThanOrEqual(2);
    for (const k of keys) expect((await verify(b.clients, k)).codeName).toBe("NOT_FOUND");
  });
});

describeWith("MONGODB_URI", mongodbUri(), "revocation when a MongoDB write is cut off half-way", () => {
  let ts: TestStore | undefined;
  let writer: TestStore | undefined;
  const instances: Instance[] = [];

  afterEach(async () => {
    for (const i of instances.splice(0)) await i.core.stop();
    await writer?.store.close();
    await ts?.destroy();
    ts = writer = undefined;
  });

  /** A over its own MongoStore (a process of its own), B over a gated one on the same database. */
  async function pair(): Promise<{ a: Instance; b: Instance; gated: GatedStore; aStore: Store }> {
    const database = randomDatabaseName();
    ts = await openTestStore("mongodb", { database });
    writer = await openTestStore("mongodb", { database });
    const root = (await createRootKey(ts.store, "test", parseRootPermission("*")))!.plaintext;
    const gated = gatedStore(ts.store);
    const a = await startInstance(writer.store, root);
    const b = await startInstance(gated.store, root);
    instances.push(a, b);
    return { a, b, gated, aStore: writer.store };
  }

  it("answers DISABLED on another instance when the connection is lost right after the data write", async () => {
    const { a, b, gated, aStore } = await pair();
    const k = await createKey(a.clients);
    await b.core.feed.sync();
    expect((await verify(b.clients, k.plaintext)).codeName).toBe("VALID");

    // The key's document: in `keys`, or in a bucket of the bucketed layout (key-layout.ts).
    const fault = severAfter(aStore, (aStore as MongoStore).layout === "bucketed" ? "buckets" : "keys", "findOneAndUpdate");
    const err = await disable(a.clients, k.id).then(
      () => null,
      (e: Error) => e,
    );
    expect(fault.severed(), `the data write went through, then the connection was lost (${err?.message})`).toBe(true);
    expect(err?.message).toMatch(/unavailable|mongodb/i);
    fault.heal();
    expect((await ts!.store.getKey(k.id))?.enabled).toBe(false);

    await b.core.feed.sync();
    expect((await verify(b.clients, k.plaintext)).codeName).toBe("DISABLED");
    // The write's done entry never came: B reads the key from the store until the intent's bound has passed...
    gated.reset();
    await verify(b.clients, k.plaintext);
    expect(gated.calls.get("getKeyByHash"), "read from the store while the write may still land").toBe(1);
    b.advance(10_001);
    await b.core.feed.sync();
    // ...and caches it again after.
    await verify(b.clients, k.plaintext);
    gated.reset();
    expect((await verify(b.clients, k.plaintext)).codeName).toBe("DISABLED");
    expect(gated.calls.get("getKeyByHash") ?? 0).toBe(0);
  });

  it("does not lose a change whose entry was held back while another writer's went first", async () => {
    const { a, b } = await pair();
    const k1 = await createKey(a.clients);
    const k2 = await createKey(b.clients);
    await b.core.feed.sync();
    await a.core.feed.sync();
    for (const k of [k1, k2]) for (const i of [a, b]) expect((await verify(i.clients, k.plaintext)).codeName).toBe("VALID");

    // A's next change entry is held just before its insert; B writes meanwhile and
    // keeps reading the feed for 2.5 s (longer than a reader would wait for a gap to fill).
    const held = holdNextInsert(writer!.store);
    const first = disable(a.clients, k1.id);
    await held.reached;
    await disable(b.clients, k2.id);
    const until = Date.now() + 2500;
    while (Date.now() < until) {
      await b.core.feed.sync();
      await new Promise((r) => setTimeout(r, 50));
    }
    held.release();
    await first;
    for (const i of [a, b]) {
      await i.core.feed.sync();
      expect((await verify(i.clients, k1.plaintext)).codeName).toBe("DISABLED");
      expect((await verify(i.clients, k2.plaintext)).codeName).toBe("DISABLED");
    }
    const all = await ts!.store.changesSince(0, 1000);
    expect(all.map((c) => c.seq)).toEqual(all.map((_, i) => all[0].seq + i));
  });
});

/** Holds the next insert into the store's change feed until released. */
function holdNextInsert(store: Store): { reached: Promise<void>; release(): void } {
  let reached!: () => void;
  let release!: () => void;
  const go = new Promise<void>((r) => (release = r));
  const p = new Promise<void>((r) => (reached = r));
  const hold = (coll: { insertOne: (...a: unknown[]) => Promise<unknown> }, restore: () => void) => {
    const real = coll.insertOne.bind(coll);
    coll.insertOne = async (...args: unknown[]) => {
      restore();
      reached();
      await go;
      return real(...args);
    };
    return coll;
  };
  const s = store as unknown as Record<string, any>;
  if (typeof s.feedOf === "function") {
    const feedOf = s.feedOf;
    s.feedOf = (seq: number) => hold(feedOf.call(s, seq), () => (s.feedOf = feedOf));
  } else {
    // The single collection of earlier versions, to show how their reader fares.
    const real = s.changes.insertOne;
    hold(s.changes, () => (s.changes.insertOne = real));
  }
  return { reached: p, release };
}
