/**
 * Usage counts of the real server process (`node dist/src/cli.js serve`),
 * driven by the reference native client (@grpc/grpc-js): 10,000 verifications
 * sent across a graceful restart are all counted, exactly once, per identity
 * and per key; counts written by the flush timer survive a crash (SIGKILL);
 * and two processes writing to one MongoDB database at once count 1,000
 * verifications exactly. LATCHKEY_USAGE_FLUSH_MS=200 throughout.
 *
 * Every process started here is SIGKILLed in afterAll whatever the test left
 * running; MongoDB databases are dropped there too.
 */
import { afterAll, describe, expect, it } from "vitest";
import {
  dropMongoDatabase,
  grpcClients,
  runCli,
  startServer,
  tempDir,
  uniqueName,
  type GrpcClients,
  type Msg,
  type ServerProcess,
} from "../integration/support.js";
import { within } from "../verify/support.js";
import { DAY, describeWith, MINUTE, mongodbUri, pool, processBook } from "./support.js";

const FLUSH = { LATCHKEY_USAGE_FLUSH_MS: "200" };
const VALID = "VERIFICATION_CODE_VALID";

/** One server process and a grpc-js client on it, with a root key. */
interface Node {
  server: ServerProcess;
  grpc: GrpcClients;
  call(service: "keys" | "identities", method: string, req: Msg): Promise<Msg>;
}

function nodeOf(server: ServerProcess, rootKey: string): Node {
  const grpc = grpcClients(server.address);
  return { server, grpc, call: (service, method, req) => grpc.call(grpc[service], method, req, rootKey) };
}

async function stopGracefully(n: Node): Promise<void> {
  n.grpc.close();
  const exit = await n.server.stop();
  expect(exit, n.server.stderr()).toEqual({ code: 0, signal: null });
}

/** Creates an identity with `n` keys; returns their ids and plaintexts. */
async function identityWithKeys(node: Node, n: number): Promise<{ identityId: string; keys: { id: string; plaintext: string }[] }> {
  const { identity } = await node.call("identities", "CreateIdentity", { external_id: uniqueName("org") });
  const keys = [];
  for (let i = 0; i < n; i++) {
    const res = await node.call("keys", "CreateKey", { api_id: "api_usage", identity_id: identity.id });
    keys.push({ id: res.key.id as string, plaintext: res.plaintext as string });
  }
  return { identityId: identity.id as string, keys };
}

/** Verifies keys[i % keys.length] for i in [from, to), spread over `nodes` round robin; every answer must be VALID. */
async function verifyRange(nodes: Node[], keys: { plaintext: string }[], from: number, to: number): Promise<void> {
  const idx = Array.from({ length: to - from }, (_, i) => from + i);
  const codes = await pool(idx, 64, async (i) => (await nodes[i % nodes.length].call("keys", "VerifyKey", { key: keys[i % keys.length].plaintext, tags: i % 10 === 0 ? ["tenth"] : [] })).code as string);
  expect(codes.filter((c) => c !== VALID)).toEqual([]);
}

const since = (t: number) => ({ seconds: String(Math.floor(t / 1000)), nanos: 0 });

async function identityTotals(node: Node, identityId: string, from: number, extra: Msg = {}): Promise<Msg> {
  return node.call("identities", "GetIdentityUsage", { id: identityId, start_time: since(from), granularity: "GRANULARITY_DAY", ...extra });
}

/** Total, VALID and per-key counts of the identity, and per-key counts read with GetKeyUsage, by minute and by day. */
async function expectCounted(node: Node, identityId: string, keys: { id: string }[], from: number, expected: { total: number; perKey: number[]; tenth: number }): Promise<void> {
  for (const [granularity, start] of [
    ["GRANULARITY_MINUTE", from - MINUTE],
    ["GRANULARITY_HOUR", from - 60 * MINUTE],
    ["GRANULARITY_DAY", from - DAY],
  ] as const) {
    const all = await node.call("identities", "GetIdentityUsage", { id: identityId, start_time: since(start), granularity });
    expect(Number(all.totals.total), granularity).toBe(expected.total);
    expect(Number(all.totals.valid), granularity).toBe(expected.total);
    const points = all.series[0].points as Msg[];
    expect(points.reduce((n, p) => n + Number(p.counts.total), 0)).toBe(expected.total);

    const byKey = await node.call("identities", "GetIdentityUsage", { id: identityId, start_time: since(start), granularity, group_by: "USAGE_GROUP_BY_KEY" });
    const perKey = Object.fromEntries((byKey.series as Msg[]).map((s) => [s.group, Number(s.totals.total)]));
    expect(perKey).toEqual(Object.fromEntries(keys.map((k, i) => [k.id, expected.perKey[i]])));

    const byTag = await node.call("identities", "GetIdentityUsage", { id: identityId, start_time: since(start), granularity, group_by: "USAGE_GROUP_BY_TAG" });
    expect((byTag.series as Msg[]).map((s) => [s.group, Number(s.totals.total)])).toEqual([["tenth", expected.tenth]]);

    for (const [i, k] of keys.entries()) {
      const own = await node.call("keys", "GetKeyUsage", { id: k.id, start_time: since(start), granularity });
      expect(Number(own.totals.total), `${granularity} ${k.id}`).toBe(expected.perKey[i]);
    }
  }
}

/** Where a test's server keeps its data: `newStore()` gives each test its own (a data dir is made anyway). */
type Backend = { newStore: () => Record<string, string>; cleanup?: () => Promise<void> };

function restartSuite(backend: Backend): void {
  const book = processBook();
  afterAll(async () => {
    await book.killAll();
    await backend.cleanup?.();
  });

  async function start(dataDir: string, env: Record<string, string>, rootKey?: string): Promise<Node> {
    const server = book.add(await startServer({ dataDir, env: { ...FLUSH, ...env } }));
    const key = rootKey ?? server.bootstrapKey;
    if (!key) throw new Error(`no root key: the first start of a fresh store prints one\n${server.stdout()}`);
    return nodeOf(server, key);
  }

  it("counts exactly 10,000 verifications sent across a graceful restart, per identity and per key", async () => {
    const dataDir = tempDir("usage");
    const env = backend.newStore();
    const t0 = Date.now();
    let node = await start(dataDir, env);
    const rootKey = node.server.bootstrapKey!;
    const { identityId, keys } = await identityWithKeys(node, 4);

    await verifyRange([node], keys, 0, 6000);
    await stopGracefully(node);

    node = await start(dataDir, env, rootKey);
    // Everything the first process counted was written by its graceful stop.
    expect(Number((await identityTotals(node, identityId, t0 - DAY)).totals.total)).toBe(6000);
    await verifyRange([node], keys, 6000, 10_000);
    await stopGracefully(node);

    node = await start(dataDir, env, rootKey);
    await expectCounted(node, identityId, keys, t0, { total: 10_000, perKey: [2500, 2500, 2500, 2500], tenth: 1000 });
    for (const k of keys) {
      const got = await node.call("keys", "GetKey", { id: k.id });
      expect(Number(got.key.last_used_at.seconds) * 1000).toBeGreaterThanOrEqual(Math.floor(t0 / 1000) * 1000);
    }
    await stopGracefully(node);
  }, 240_000);

  it("keeps counts the flush timer wrote when the process is killed (SIGKILL)", async () => {
    const dataDir = tempDir("usage");
    const env = backend.newStore();
    const t0 = Date.now();
    let node = await start(dataDir, env);
    const rootKey = node.server.bootstrapKey!;
    const { identityId, keys } = await identityWithKeys(node, 2);
    await verifyRange([node], keys, 0, 500);
    // No stop: the timer alone writes them, within a few flush intervals.
    await within(15_000, 100, async () => {
      const n = Number((await identityTotals(node, identityId, t0 - DAY)).totals.total);
      return { ok: n === 500, seen: n };
    });
    node.grpc.close();
    expect(await node.server.kill("SIGKILL")).toEqual({ code: null, signal: "SIGKILL" });

    node = await start(dataDir, env, rootKey);
    await expectCounted(node, identityId, keys, t0, { total: 500, perKey: [250, 250], tenth: 50 });
    await stopGracefully(node);
  }, 120_000);
}

describe("usage through restarts (embedded store, real process)", () => {
  restartSuite({ newStore: () => ({}) });
});

const mongoEnv = (database: string) => ({ MONGODB_URI: mongodbUri()!, LATCHKEY_MONGODB_DATABASE: database });

describeWith("MONGODB_URI", mongodbUri(), "usage through restarts (mongodb store, real process)", () => {
  const databases: string[] = [];
  restartSuite({
    // A database per test, so each first start prints its own bootstrap key.
    newStore: () => {
      databases.push(uniqueName("lk_usage"));
      return mongoEnv(databases[databases.length - 1]);
    },
    cleanup: async () => {
      for (const d of databases.splice(0)) await dropMongoDatabase(d).catch(() => undefined);
    },
  });
});

describeWith("MONGODB_URI", mongodbUri(), "usage from two processes on one MongoDB database", () => {
  const book = processBook();
  let database = "";
  afterAll(async () => {
    await book.killAll();
    if (database) await dropMongoDatabase(database).catch(() => undefined);
  });

  it("counts exactly 1,000 verifications split across two processes writing at once", async () => {
    database = uniqueName("lk_usage2");
    const env = { ...FLUSH, ...mongoEnv(database) };
    const created = await runCli(["root-keys", "create", "--name", "t", "--permission", "*"], env);
    expect(created.code, created.stderr).toBe(0);
    const rootKey = (JSON.parse(created.stdout.trim().split("\n").pop()!) as { key: string }).key;
    const t0 = Date.now();
    const a = nodeOf(book.add(await startServer({ env })), rootKey);
    const b = nodeOf(book.add(await startServer({ env })), rootKey);
    const { identityId, keys } = await identityWithKeys(a, 3);

    // Both processes count the same keys in the same buckets and flush every 200 ms.
    await verifyRange([a, b], keys, 0, 1000);
    await Promise.all([stopGracefully(a), stopGracefully(b)]);

    const reader = nodeOf(book.add(await startServer({ env })), rootKey);
    await expectCounted(reader, identityId, keys, t0, { total: 1000, perKey: [334, 333, 333], tenth: 100 });
    await stopGracefully(reader);
  }, 120_000);
});
