import { Code, ConnectError, createClient, createRouterTransport, type Client, type Interceptor } from "@connectrpc/connect";
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Writable } from "node:stream";
import { MongoClient } from "mongodb";
import { afterEach, beforeEach, expect } from "vitest";
import { IdentityService } from "../../gen/latchkey/v1/identity_service_pb.js";
import { KeyService } from "../../gen/latchkey/v1/key_service_pb.js";
import { createRootKey } from "../../src/domain/root-keys.js";
import { DEFAULT_CORE_OPTIONS, createCore, type Core, type CoreOptions } from "../../src/app/compose.js";
import { parseRootPermission } from "../../src/domain/access.js";
import type { IdentityRecord, KeyRecord } from "../../src/domain/types.js";
import { createMemoryCounter } from "../../src/ratelimit/counter.js";
import { createLogger } from "../../src/observability/logger.js";
import { createMetrics, type Metrics } from "../../src/observability/metrics.js";
import { SqliteStore } from "../../src/storage/embedded/sqlite-store.js";
import { MongoStore, type MongoStoreOptions } from "../../src/storage/mongodb/mongo-store.js";
import { storeDatabases } from "../../src/storage/mongodb/key-layout.js";
import type { Store } from "../../src/storage/store.js";

export type StoreKind = "embedded" | "mongodb";

/** Embedded stores live in memory-backed /dev/shm when there is one: fsync there costs nothing. */
const TEST_TMP = existsSync("/dev/shm") ? "/dev/shm" : tmpdir();

/** A store on its own storage (temp dir or random database) that can be reopened and destroyed. */
export interface TestStore {
  readonly store: Store;
  /** Closes the store and opens a new one on the same data. */
  reopen(): Promise<Store>;
  /** Closes the store and deletes its data. */
  destroy(): Promise<void>;
}

/** The MongoDB URI the tests use, or a reason the MongoDB tests cannot run. */
export function mongoUri(): string | null {
  return process.env.MONGODB_URI || null;
}

/**
 * Opens an initialised store: SQLite in a fresh temp dir, or MongoDB at
 * MONGODB_URI in `database` (default: a new random database, dropped by destroy()),
 * with `mongo` options over the defaults (e.g. `layout: "indexed"`, MongoDB's).
 */
export async function openTestStore(kind: StoreKind, opts: { database?: string; mongo?: Partial<MongoStoreOptions> } = {}): Promise<TestStore> {
  if (kind === "embedded") {
    const dir = await mkdtemp(join(TEST_TMP, "latchkey-test-"));
    const path = join(dir, "latchkey.db");
    let store = new SqliteStore(path);
    await store.init();
    return {
      get store() {
        return store;
      },
      async reopen() {
        await store.close();
        store = new SqliteStore(path);
        await store.init();
        return store;
      },
      async destroy() {
        await store.close();
        await rm(dir, { recursive: true, force: true });
      },
    };
  }
  const uri = mongoUri();
  if (!uri) throw new Error("MONGODB_URI is not set: the MongoDB store cannot be tested");
  const database = opts.database ?? randomDatabaseName();
  const open = async () => {
    const s = new MongoStore({ uri, database, serverSelectionTimeoutMs: 5000, ...opts.mongo });
    await s.init();
    return s;
  };
  let store = await open();
  return {
    get store() {
      return store;
    },
    async reopen() {
      await store.close();
      store = await open();
      return store;
    },
    async destroy() {
      await store.close();
      await dropDatabase(uri, database);
    },
  };
}

export function randomDatabaseName(): string {
  return `latchkey_test_${randomBytes(6).toString("hex")}`;
}

/** Drops a store's database and its companion databases (src/storage/mongodb/key-layout.ts). */
export async function dropDatabase(uri: string, database: string): Promise<void> {
  const client = new MongoClient(uri, { serverSelectionTimeoutMS: 5000 });
  try {
    for (const name of storeDatabases(database)) await client.db(name).dropDatabase();
  } finally {
    await client.close();
  }
}

/** The FerretDB version when `uri` points at FerretDB rather than MongoDB, else null. */
export async function ferretDbVersion(uri: string): Promise<string | null> {
  const client = new MongoClient(uri, { serverSelectionTimeoutMS: 5000 });
  try {
    const info = await client.db("admin").command({ buildInfo: 1 });
    return typeof info.ferretdbVersion === "string" ? info.ferretdbVersion : null;
  } finally {
    await client.close();
  }
}

/** A short random suffix, so each test's names are its own. */
export function unique(prefix: string): string {
  return `${prefix}-${randomBytes(5).toString("hex")}`;
}

export interface Clients {
  identities: Client<typeof IdentityService>;
  keys: Client<typeof KeyService>;
}

export interface HarnessOptions {
  /** Default: LATCHKEY_TEST_STORE, else "embedded". */
  store?: StoreKind;
  /** How long the authenticator remembers a root key. Default 0: revocation is immediate. */
  rootKeyCacheMs?: number;
  /** Wraps the store the services see (the harness keeps the real one), e.g. to inject failures. */
  wrapStore?: (store: Store) => Store;
  /** Core options over DEFAULT_CORE_OPTIONS, e.g. a long `usageFlushMs` so only explicit flushes write usage. */
  coreOptions?: Partial<CoreOptions>;
}

export interface Harness {
  /** The real store, for arranging data and checking what was (not) written. */
  readonly store: Store;
  /** The wired core the clients talk to (e.g. `core.recorder.flush()` writes pending usage). */
  readonly core: Core;
  /**
   * The clock rate-limit windows are counted on: frozen at the harness's start
   * (windows are aligned to multiples of their duration, so a test on the real
   * clock could straddle a boundary by accident); a test may move it.
   */
  readonly counterClock: { now: number };
  /** Plaintext of a root key with every permission on every api. */
  readonly rootKey: string;
  /** Clients authenticated with `rootKey`. */
  readonly admin: Clients;
  /** Clients that send `authorization: Bearer <rootKey>`, or no authorization header for null. */
  clients(rootKey: string | null): Clients;
  /** Clients sending this exact `authorization` header value. */
  clientsWithHeader(authorization: string): Clients;
  /** A new root key with permissions such as "read", "write:api_a" or "*"; returns its plaintext. */
  createRootKey(...permissions: string[]): Promise<string>;
  /** Clients for a new root key with these permissions. */
  clientsWith(...permissions: string[]): Promise<Clients>;
  /** JSON log lines the server wrote. */
  readonly logs: string[];
  /** Every identity and key in the store, for "nothing was written" checks. */
  snapshot(): Promise<{ identities: IdentityRecord[]; keys: KeyRecord[] }>;
  close(): Promise<void>;
}

// One metrics registry per test file: default metrics install process-wide hooks.
let sharedMetrics: Metrics | undefined;

/**
 * An isolated in-process Latchkey: a fresh store, a root key with every
 * permission, and Connect clients over `createRouterTransport` with the real
 * routes and interceptors, wired as src/app/compose.ts wires them.
 */
export async function createHarness(opts: HarnessOptions = {}): Promise<Harness> {
  const kind = opts.store ?? ((process.env.LATCHKEY_TEST_STORE as StoreKind | undefined) || "embedded");
  const testStore = await openTestStore(kind);
  const store = testStore.store;
  const served = opts.wrapStore ? opts.wrapStore(store) : store;
  const logs: string[] = [];
  const logger = createLogger(
    "info",
    new Writable({
      write(chunk, _enc, done) {
        logs.push(...String(chunk).split("\n").filter(Boolean));
        done();
      },
    }),
  );
  sharedMetrics ??= createMetrics();
  const counterClock = { now: Date.now() };
  const core = createCore({
    store: served,
    logger,
    metrics: sharedMetrics,
    counter: createMemoryCounter({ now: () => counterClock.now }),
    options: { ...DEFAULT_CORE_OPTIONS, ...opts.coreOptions, rootKeyCacheMs: opts.rootKeyCacheMs ?? 0 },
  });
  await core.start();
  const routes = core.routes;
  const serverInterceptors = core.interceptors;

  const clientsWithHeader = (authorization: string | null): Clients => {
    const setHeader: Interceptor = (next) => (req) => {
      if (authorization !== null) req.header.set("authorization", authorization);
      return next(req);
    };
    const transport = createRouterTransport(routes, {
      router: { interceptors: serverInterceptors },
      transport: { interceptors: [setHeader] },
    });
    return { identities: createClient(IdentityService, transport), keys: createClient(KeyService, transport) };
  };
  const clients = (rootKey: string | null) => clientsWithHeader(rootKey === null ? null : `Bearer ${rootKey}`);

  const newRootKey = async (...permissions: string[]) => {
    const res = await createRootKey(store, "test", permissions.flatMap(parseRootPermission));
    return res!.plaintext;
  };
  const rootKey = await newRootKey("*");

  return {
    store,
    core,
    counterClock,
    rootKey,
    admin: clients(rootKey),
    clients,
    clientsWithHeader,
    createRootKey: newRootKey,
    clientsWith: async (...permissions) => clients(await newRootKey(...permissions)),
    logs,
    async snapshot() {
      return {
        identities: await store.listIdentities({ limit: 100_000, afterId: null }, null),
        keys: await store.listKeys({}, { limit: 100_000, afterId: null }),
      };
    },
    close: async () => {
      await core.stop();
      await testStore.destroy();
    },
  };
}

/**
 * Registers a fresh harness for every test of the enclosing suite and returns
 * a getter for the current one.
 */
export function useHarness(opts: HarnessOptions = {}): () => Harness {
  let current: Harness | undefined;
  beforeEach(async () => {
    current = await createHarness(opts);
  });
  afterEach(async () => {
    await current?.close();
    current = undefined;
  });
  return () => {
    if (!current) throw new Error("harness used outside a test");
    return current;
  };
}

/** The ConnectError a call failed with; fails the test when the call succeeds. */
export async function rpcError(call: Promise<unknown>): Promise<ConnectError> {
  try {
    await call;
  } catch (err) {
    return ConnectError.from(err);
  }
  throw new Error("expected the call to fail, but it succeeded");
}

/** Shorthand: the status code a call failed with, by name ("InvalidArgument"). */
export async function codeOf(call: Promise<unknown>): Promise<keyof typeof Code> {
  return Code[(await rpcError(call)).code] as keyof typeof Code;
}

/**
 * Runs `call` and expects it to fail with `code` — for INVALID_ARGUMENT with a
 * message that starts with the offending `field` — having written nothing.
 */
export async function expectRefused(h: Harness, call: () => Promise<unknown>, code: Code, field?: string): Promise<ConnectError> {
  const before = await h.snapshot();
  const err = await rpcError(call());
  expect(Code[err.code]).toBe(Code[code]);
  if (field !== undefined) expect(err.rawMessage.startsWith(`${field}: `), `"${err.rawMessage}" should name ${field}`).toBe(true);
  expect(await h.snapshot()).toEqual(before);
  return err;
}
