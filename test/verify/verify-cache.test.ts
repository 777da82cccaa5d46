/**
 * The verification cache, seen through VerifyKey: lookups it saves (also for
 * unknown keys), writes it must not hide (on this instance at once, on another
 * instance sharing the store within 1 second), and its bound. In process:
 * createCore over a (counted) store, with Connect clients over
 * createRouterTransport; a second core on the same store plays another instance.
 */
import { Writable } from "node:stream";
import { afterEach, expect, it, vi } from "vitest";
import { createRouterTransport, createClient, type Interceptor } from "@connectrpc/connect";
import { IdentityService } from "../../gen/latchkey/v1/identity_service_pb.js";
import { KeyService } from "../../gen/latchkey/v1/key_service_pb.js";
import { parseRootPermission } from "../../src/domain/access.js";
import { generateKey } from "../../src/domain/key-format.js";
import { createRootKey } from "../../src/domain/root-keys.js";
import { DEFAULT_CORE_OPTIONS, createCore, type Core, type CoreOptions } from "../../src/app/compose.js";
import { createLogger } from "../../src/observability/logger.js";
import { createMetrics } from "../../src/observability/metrics.js";
import type { Store } from "../../src/storage/store.js";
import { openTestStore, unique, type Clients, type TestStore } from "../support/harness.js";
import { countingStore, createIdentityWithKeys, createKey, describeEachStore, past, verify, within } from "./support.js";

// Lets a test know a key's plaintext before CreateKey makes it: queued byte
// strings are handed out by randomBytes (when the length matches) before real ones.
const forcedBytes = vi.hoisted(() => [] as Buffer[]);
vi.mock("node:crypto", async (importOriginal) => {
  const real = await importOriginal<typeof import("node:crypto")>();
  const randomBytes = ((n: number, ...rest: unknown[]) =>
    forcedBytes.length > 0 && forcedBytes[0].length === n && rest.length === 0
      ? forcedBytes.shift()!
      : (real.randomBytes as (...a: unknown[]) => Buffer)(n, ...rest)) as typeof real.randomBytes;
  return { ...real, default: { ...real, randomBytes }, randomBytes };
});

const metrics = createMetrics();
const quietLogger = createLogger("warn", new Writable({ write: (_c, _e, done) => done() }));

interface Instance {
  core: Core;
  clients: Clients;
}

/** One Latchkey instance (its own cache and change feed) over `store`, with clients for `rootKey`. */
async function startInstance(store: Store, rootKey: string, options: Partial<CoreOptions> = {}): Promise<Instance> {
  const core = createCore({ store, logger: quietLogger, metrics, options: { ...DEFAULT_CORE_OPTIONS, rootKeyCacheMs: 0, ...options } });
  await core.start();
  const auth: Interceptor = (next) => (req) => {
    req.header.set("authorization", `Bearer ${rootKey}`);
    return next(req);
  };
  const transport = createRouterTransport(core.routes, { router: { interceptors: core.interceptors }, transport: { interceptors: [auth] } });
  return { core, clients: { identities: createClient(IdentityService, transport), keys: createClient(KeyService, transport) } };
}

describeEachStore("VerifyKey caching", (kind) => {
  let ts: TestStore | undefined;
  const instances: Instance[] = [];
  let counting: ReturnType<typeof countingStore>;

  /** A fresh store with a root key, and `n` instances on it: the first over a counted wrapper. */
  async function setup(n: number, options: Partial<CoreOptions> = {}): Promise<Instance[]> {
    ts = await openTestStore(kind);
    const root = (await createRootKey(ts.store, "test", parseRootPermission("*")))!.plaintext;
    counting = countingStore(ts.store);
    for (let i = 0; i < n; i++) instances.push(await startInstance(i === 0 ? counting.store : ts.store, root, options));
    return instances;
  }

  afterEach(async () => {
    for (const i of instances.splice(0)) await i.core.stop();
    await ts?.destroy();
    ts = undefined;
    forcedBytes.length = 0;
  });

  it("reads a known key and its identity from the store once for repeated verifications", async () => {
    const [a] = await setup(1);
    const { keys } = await createIdentityWithKeys(a.clients, 1, { externalId: unique("org") });
    counting.reset();
    for (let i = 0; i < 5; i++) expect((await verify(a.clients, keys[0])).codeName).toBe("VALID");
    expect(counting.calls.get("getKeyByHash")).toBe(1);
    expect(counting.calls.get("getIdentity")).toBe(1);
  });

  it("remembers an unknown key: verifying it twice does one store lookup", async () => {
    const [a] = await setup(1);
    const unknown = generateKey("sk", 16).plaintext;
    counting.reset();
    expect((await verify(a.clients, unknown)).codeName).toBe("NOT_FOUND");
    expect((await verify(a.clients, unknown)).codeName).toBe("NOT_FOUND");
    expect(counting.calls.get("getKeyByHash")).toBe(1);
  });

  it("shares one store lookup among concurrent verifications of an uncached key", async () => {
    const [a] = await setup(1);
    const { plaintext } = await createKey(a.clients);
    a.core.cache.clear();
    counting.reset();
    const res = await Promise.all(Array.from({ length: 20 }, () => verify(a.clients, plaintext)));
    expect(res.every((r) => r.codeName === "VALID")).toBe(true);
    expect(counting.calls.get("getKeyByHash")).toBe(1);
  });

  it("verifies VALID at once a key created on the same instance after its hash was cached as unknown", async () => {
    const [a] = await setup(1);
    const bytes = (await vi.importActual<typeof import("node:crypto")>("node:crypto")).randomBytes(16);
    forcedBytes.push(bytes);
    const upcoming = generateKey("sk", 16).plaintext;
    expect((await verify(a.clients, upcoming)).codeName).toBe("NOT_FOUND");
    expect((await verify(a.clients, upcoming)).codeName, "now cached as unknown").toBe("NOT_FOUND");

    forcedBytes.push(bytes);
    const created = await createKey(a.clients, { prefix: "sk", byteLength: 16 });
    expect(created.plaintext).toBe(upcoming);
    const res = await verify(a.clients, upcoming);
    expect(res.codeName).toBe("VALID");
    expect(res.keyId).toBe(created.id);
  });

  it("answers DISABLED, EXPIRED and NOT_FOUND at once on the instance that made the change", async () => {
    const [a] = await setup(1);
    const k = await createKey(a.clients);
    expect((await verify(a.clients, k.plaintext)).codeName).toBe("VALID");
    await a.clients.keys.updateKey({ key: { id: k.id, enabled: false }, updateMask: { paths: ["enabled"] } });
    expect((await verify(a.clients, k.plaintext)).codeName).toBe("DISABLED");
    await a.clients.keys.updateKey({ key: { id: k.id, enabled: true, expiresAt: past() }, updateMask: { paths: ["enabled", "expires_at"] } });
    expect((await verify(a.clients, k.plaintext)).codeName).toBe("EXPIRED");
    await a.clients.keys.deleteKey({ id: k.id });
    expect((await verify(a.clients, k.plaintext)).codeName).toBe("NOT_FOUND");
  });

  it("revokes a deleted key on another instance within 1 second", async () => {
    const [a, b] = await setup(2);
    const k = await createKey(a.clients);
    expect((await verify(a.clients, k.plaintext)).codeName).toBe("VALID");
    expect((await verify(b.clients, k.plaintext)).codeName).toBe("VALID");
    await a.clients.keys.deleteKey({ id: k.id });
    await within(1000, 50, async () => {
      const r = await verify(b.clients, k.plaintext);
      return { ok: r.codeName === "NOT_FOUND", seen: r.codeName };
    });
  });

  it("disables a key on another instance within 1 second", async () => {
    const [a, b] = await setup(2);
    const k = await createKey(a.clients);
    expect((await verify(b.clients, k.plaintext)).codeName).toBe("VALID");
    await a.clients.keys.updateKey({ key: { id: k.id, enabled: false }, updateMask: { paths: ["enabled"] } });
    await within(1000, 50, async () => {
      const r = await verify(b.clients, k.plaintext);
      return { ok: r.codeName === "DISABLED", seen: r.codeName };
    });
  });

  it("shows an identity's new meta on another instance within 1 second", async () => {
    const [a, b] = await setup(2);
    const { identityId, keys } = await createIdentityWithKeys(a.clients, 2, { externalId: unique("org"), meta: { plan: "free" } });
    for (const k of keys) expect((await verify(b.clients, k)).identity?.meta).toEqual({ plan: "free" });
    await a.clients.identities.updateIdentity({ identity: { id: identityId, meta: { plan: "pro" } }, updateMask: { paths: ["meta"] } });
    await within(1000, 50, async () => {
      const seen = await Promise.all(keys.map(async (k) => (await verify(b.clients, k)).identity?.meta));
      return { ok: seen.every((m) => JSON.stringify(m) === JSON.stringify({ plan: "pro" })), seen };
    });
  });

  it("verifies on another instance, within 1 second, a key created after that instance cached its hash as unknown", async () => {
    const [a, b] = await setup(2);
    const bytes = (await vi.importActual<typeof import("node:crypto")>("node:crypto")).randomBytes(16);
    forcedBytes.push(bytes);
    const upcoming = generateKey("sk", 16).plaintext;
    expect((await verify(b.clients, upcoming)).codeName).toBe("NOT_FOUND");
    forcedBytes.push(bytes);
    expect((await createKey(a.clients, { prefix: "sk" })).plaintext).toBe(upcoming);
    await within(1000, 50, async () => {
      const r = await verify(b.clients, upcoming);
      return { ok: r.codeName === "VALID", seen: r.codeName };
    });
  });

  it("never holds more keys or identities than cacheMaxEntries, and still answers correctly", async () => {
    const [a] = await setup(1, { cacheMaxEntries: 4 });
    const max = 4;
    const made: string[] = [];
    for (let i = 0; i < 6; i++) {
      const { keys } = await createIdentityWithKeys(a.clients, 2, { externalId: unique("org") });
      made.push(...keys);
    }
    for (let round = 0; round < 2; round++) {
      for (const k of made) {
        expect((await verify(a.clients, k)).codeName).toBe("VALID");
        expect((await verify(a.clients, generateKey("sk", 16).plaintext)).codeName).toBe("NOT_FOUND");
        const { keys, identities } = a.core.cache.stats();
        expect(keys).toBeLessThanOrEqual(max);
        expect(identities).toBeLessThanOrEqual(max);
      }
    }
    expect(a.core.cache.stats().keys).toBe(max);
    // Evicted entries were read again: more lookups than distinct keys.
    expect(counting.calls.get("getKeyByHash")!).toBeGreaterThan(made.length * 2);
  });
});
