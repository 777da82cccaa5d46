/**
 * Scale-out: two real server processes (`node dist/src/cli.js serve`) on one
 * MongoDB database, driven concurrently by @grpc/grpc-js. Shared identity
 * limits (counted in Redis, and in MongoDB), credits, and revocation, key
 * disabling and identity changes reaching the other process within 1 second.
 *
 * Each test gets its own database and its own two processes, stopped in
 * afterEach (also when the test fails). Needs MONGODB_URI, and REDIS_URL for
 * the Redis backend: skipped locally without them, failing in CI.
 */
import { Redis } from "ioredis";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import {
  dropMongoDatabase,
  grpcClients,
  runCli,
  startServer,
  uniqueName,
  type GrpcClients,
  type Msg,
  type ServerProcess,
} from "../integration/support.js";
import { count, describeWith, isFerretDb, mongodbUri, redisUrl, within } from "./support.js";

const VALID = "VERIFICATION_CODE_VALID";

interface Pair {
  rootKey: string;
  servers: ServerProcess[];
  clients: GrpcClients[];
  /** One unary call on process `i` (0 = A, 1 = B). */
  call(i: number, service: "keys" | "identities", method: string, req: Msg): Promise<Msg>;
  verify(i: number, key: string): Promise<Msg>;
}

/**
 * Registers, for every test of the enclosing suite, two server processes on a
 * new database with the given rate-limit backend, and a root key made with the
 * CLI against the same database.
 */
function usePair(backend: "redis" | "mongodb", extraEnv: Record<string, string> = {}): () => Pair {
  let pair: Pair | undefined;
  let database = "";
  const servers: ServerProcess[] = [];
  const clients: GrpcClients[] = [];

  beforeEach(async () => {
    database = uniqueName("lk_verify");
    const env: Record<string, string> = {
      MONGODB_URI: mongodbUri()!,
      LATCHKEY_MONGODB_DATABASE: database,
      LATCHKEY_RATELIMIT_BACKEND: backend,
      LATCHKEY_METRICS_PORT: "0",
      ...extraEnv,
    };
    if (backend === "redis") env.LATCHKEY_REDIS_URL = redisUrl()!;
    const created = await runCli(["root-keys", "create", "--name", "t", "--permission", "*"], env);
    expect(created.code, created.stderr).toBe(0);
    const rootKey = (JSON.parse(created.stdout.trim().split("\n").pop()!) as { key: string }).key;
    expect(rootKey).toMatch(/^lkroot_/);
    // Started one by one, each pushed as soon as it runs, so afterEach stops whatever started.
    for (let i = 0; i < 2; i++) {
      servers.push(await startServer({ env }));
      clients.push(grpcClients(servers[i].address));
    }
    const call = (i: number, service: "keys" | "identities", method: string, req: Msg) =>
      clients[i].call(clients[i][service], method, req, rootKey);
    pair = { rootKey, servers, clients, call, verify: (i, key) => call(i, "keys", "VerifyKey", { key }) };
  });

  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    await Promise.all(servers.splice(0).map((s) => s.kill("SIGKILL")));
    if (database) await dropMongoDatabase(database).catch(() => undefined);
    pair = undefined;
  });

  return () => {
    if (!pair) throw new Error("pair used outside a test");
    return pair;
  };
}

/** An identity with `n` keys, made through process A. */
async function identityWithKeys(p: Pair, n: number, identity: Msg): Promise<{ id: string; keys: string[]; keyIds: string[] }> {
  const { identity: created } = await p.call(0, "identities", "CreateIdentity", { external_id: uniqueName("org"), ...identity });
  const keys: string[] = [];
  const keyIds: string[] = [];
  for (let i = 0; i < n; i++) {
    const res = await p.call(0, "keys", "CreateKey", { api_id: "api_multi", identity_id: created.id });
    keys.push(res.plaintext);
    keyIds.push(res.key.id);
  }
  return { id: created.id, keys, keyIds };
}

/** `n` verifications at once, alternating between the two processes and over `keys`. */
async function verifyAcross(p: Pair, keys: string[], n: number): Promise<string[]> {
  const res = await Promise.all(Array.from({ length: n }, (_, i) => p.verify(i % 2, keys[i % keys.length])));
  return res.map((r) => r.code as string);
}

function sharedLimitSuite(backend: "redis" | "mongodb"): void {
  const pair = usePair(backend);

  it("admits exactly 20 of 60 concurrent verifications split over both processes against an identity's 20-per-hour limit", async () => {
    const p = pair();
    // An hour: windows are aligned to multiples of their duration, and this test must not straddle a boundary.
    const { keys } = await identityWithKeys(p, 3, {
      ratelimits: [{ name: "requests", limit: "20", duration: { seconds: "3600" }, auto_apply: true }],
    });
    const codes = await verifyAcross(p, keys, 60);
    expect(count(codes, VALID)).toBe(20);
    expect(count(codes, "VERIFICATION_CODE_RATE_LIMITED")).toBe(40);
  }, 60_000);

  if (backend !== "redis") return;

  it("admits exactly 1,000 of 1,300 verifications over both processes against a 1,000-per-hour limit they lease in blocks (docs/credits.md, \"Rate-limit leases\")", async () => {
    const p = pair();
    const { id, keys } = await identityWithKeys(p, 3, {
      ratelimits: [{ name: "requests", limit: "1000", duration: { seconds: "3600" }, auto_apply: true }],
    });
    const redis = new Redis(redisUrl()!);
    try {
      const window = Math.floor(Date.now() / 3_600_000);
      const inRedis = async () => Number((await redis.get(`lk:i:${id}:requests:3600000:${window}`)) ?? 0);
      const codes = await verifyAcross(p, keys, 50);
      // Each process took tokens ahead with its first take: Redis counts more than the 50 answered.
      expect(await inRedis()).toBeGreaterThan(50);
      for (let wave = 1; wave < 26; wave++) codes.push(...(await verifyAcross(p, keys, 50)));
      expect(count(codes, VALID)).toBe(1000);
      expect(count(codes, "VERIFICATION_CODE_RATE_LIMITED")).toBe(300);
      expect(await inRedis()).toBe(1000);
    } finally {
      redis.disconnect();
    }
  }, 60_000);
}

describeWith("MONGODB_URI", mongodbUri(), "two server processes on one MongoDB database", () => {
  describeWith("REDIS_URL", redisUrl(), "with the redis rate-limit backend", () => sharedLimitSuite("redis"));

  // rate-limiter-flexible's MongoDB limiter needs atomic $inc, which FerretDB lacks:
  // there the server must refuse the backend; on MongoDB it must hold the pool.
  describe("with the mongodb rate-limit backend", () => {
    if (isFerretDb()) {
      it("refuses to start on FerretDB, naming the variable and the way out", async () => {
        const env = { MONGODB_URI: mongodbUri()!, LATCHKEY_MONGODB_DATABASE: uniqueName("lk_verify"), LATCHKEY_RATELIMIT_BACKEND: "mongodb" };
        const run = await runCli(["serve"], { ...env, LATCHKEY_PORT: "0", LATCHKEY_METRICS_PORT: "0" });
        expect(run.code).toBe(2);
        expect(run.stderr).toMatch(/LATCHKEY_RATELIMIT_BACKEND=mongodb needs MongoDB/);
        expect(run.stderr).toMatch(/LATCHKEY_REDIS_URL/);
      });
    } else {
      sharedLimitSuite("mongodb");
    }
  });
});

describeWith("MONGODB_URI", mongodbUri(), "two server processes on one MongoDB database and Redis", () =>
  describeWith("REDIS_URL", redisUrl(), "with Redis counters", () => {
  describe("credits", () => {
    const pair = usePair("redis");

    it("admits exactly 50 of 120 concurrent verifications split over both processes against 50 shared credits", async () => {
      const p = pair();
      const { id, keys } = await identityWithKeys(p, 3, { credits: { remaining: "50" } });
      const codes = await verifyAcross(p, keys, 120);
      expect(count(codes, VALID)).toBe(50);
      expect(count(codes, "VERIFICATION_CODE_USAGE_EXCEEDED")).toBe(70);
      const { identity } = await p.call(1, "identities", "GetIdentity", { id });
      expect(identity.credits.remaining).toBe("0");
    }, 60_000);

    it("leases a busy balance to both processes without admitting more than it; a kill -9 strands at most one lease, and an update waits it out (docs/credits.md, \"Credit leases\")", async () => {
      const p = pair();
      const BALANCE = 100_000;
      const { id, keys } = await identityWithKeys(p, 3, { credits: { remaining: String(BALANCE) } });
      const codes: string[] = [];
      for (let wave = 0; wave < 12; wave++) codes.push(...(await verifyAcross(p, keys, 100)));
      // A dies with whatever lease it holds — at once: an idle lease goes back 25 ms after its last spend.
      await p.servers[0].kill("SIGKILL");
      const redis = new Redis(redisUrl()!);
      try {
        const balanceKey = (await redis.keys(`lk:*:cr:i:${id}`))[0]!;
        expect((await redis.hgetall(balanceKey)).lx, "a lease was granted (its expiry recorded)").toBeDefined();
        const valid = count(codes, VALID);
        expect(valid).toBe(1_200);
        // In Redis: the balance less what was spent and what the leases out hold — at most one
        // per process (A's, stranded; B's, back once idle), each ≤ 1/1,024 of what was left.
        const out = BALANCE - valid - Number(await redis.hget(balanceKey, "r"));
        process.stdout.write(`[credit leases, two processes] ${valid} VALID; out in leases when A was killed: ${out}\n`);
        expect(out).toBeGreaterThanOrEqual(0);
        expect(out).toBeLessThanOrEqual(2 * Math.floor(BALANCE / 1024));
      } finally {
        redis.disconnect();
      }
      // A set waits until B's lease is back and A's dead one has expired; then it holds exactly.
      const { credits } = await p.call(1, "keys", "UpdateCredits", { identity_id: id, operation: "CREDITS_OPERATION_SET", value: "25" });
      expect(credits.remaining).toBe("25");
      const after = await Promise.all(Array.from({ length: 40 }, (_, i) => p.verify(1, keys[i % 3])));
      expect(count(after.map((r) => r.code as string), VALID)).toBe(25);
      expect((await p.call(1, "identities", "GetIdentity", { id })).identity.credits.remaining).toBe("0");
    }, 60_000);

  });

  describe("credits, updated while both processes verify (with leases, and with LATCHKEY_CREDITS_LEASE_MAX=0)", () => {
    for (const leaseMax of ["1000", "0"]) {
      describe(`LATCHKEY_CREDITS_LEASE_MAX=${leaseMax}`, () => {
        const pair = usePair("redis", { LATCHKEY_CREDITS_LEASE_MAX: leaseMax });
        it("tops up a balance both processes verify against all the time: every UpdateCredits goes through, and the balance counts every VALID", async () => {
          const p = pair();
          const BALANCE = 1_000_000;
          const { id, keys } = await identityWithKeys(p, 3, { credits: { remaining: String(BALANCE) } });
          let running = true;
          let valid = 0;
          const load = async (i: number, n: number) => {
            for (let k = n; running; k++) if ((await p.verify(i, keys[k % 3])).code === VALID) valid++;
          };
          const loads = Array.from({ length: 16 }, (_, n) => load(n % 2, n));
          await vi.waitUntil(() => valid > 500, { timeout: 10_000, interval: 10 });
          const updates: string[] = [];
          for (const [operation, value] of [["CREDITS_OPERATION_INCREMENT", "1000"], ["CREDITS_OPERATION_DECREMENT", "300"], ["CREDITS_OPERATION_INCREMENT", "50"]] as const) {
            updates.push((await p.call(updates.length % 2, "keys", "UpdateCredits", { identity_id: id, operation, value })).credits.remaining as string);
          }
          running = false;
          await Promise.all(loads);
          expect(updates).toHaveLength(3);
          // A decrement by 0 waits for the leases out, as every decrement does: then the balance is exact.
          const { credits } = await p.call(0, "keys", "UpdateCredits", { identity_id: id, operation: "CREDITS_OPERATION_DECREMENT", value: "0" });
          expect(Number(credits.remaining)).toBe(BALANCE + 1_000 - 300 + 50 - valid);
        }, 60_000);
      });
    }
  });

  describe("caching and revocation", () => {
    const pair = usePair("redis");

    /** Verifies on both processes, so that both hold the key in their caches. */
    async function cachedOnBoth(p: Pair): Promise<{ key: string; id: string; identityId: string }> {
      const { id, keys, keyIds } = await identityWithKeys(p, 1, { meta: { fields: { plan: { stringValue: "free" } } } });
      for (const i of [0, 1]) expect((await p.verify(i, keys[0])).code).toBe(VALID);
      return { key: keys[0], id: keyIds[0], identityId: id };
    }

    it("answers NOT_FOUND on process B within 1 second of a DeleteKey on process A", async () => {
      const p = pair();
      const { key, id } = await cachedOnBoth(p);
      await p.call(0, "keys", "DeleteKey", { id });
      expect((await p.verify(0, key)).code, "at once on the writing process").toBe("VERIFICATION_CODE_NOT_FOUND");
      await within(1000, 50, async () => {
        const r = await p.verify(1, key);
        return { ok: r.code === "VERIFICATION_CODE_NOT_FOUND", seen: r.code };
      });
    });

    it("answers DISABLED on process B within 1 second of disabling the key on process A", async () => {
      const p = pair();
      const { key, id } = await cachedOnBoth(p);
      await p.call(0, "keys", "UpdateKey", { key: { id, enabled: false }, update_mask: { paths: ["enabled"] } });
      await within(1000, 50, async () => {
        const r = await p.verify(1, key);
        return { ok: r.code === "VERIFICATION_CODE_DISABLED", seen: r.code };
      });
    });

    it("shows an identity's new meta on process B within 1 second of the change on process A", async () => {
      const p = pair();
      const { key, identityId } = await cachedOnBoth(p);
      await p.call(0, "identities", "UpdateIdentity", {
        identity: { id: identityId, meta: { fields: { plan: { stringValue: "pro" } } } },
        update_mask: { paths: ["meta"] },
      });
      await within(1000, 50, async () => {
        const r = await p.verify(1, key);
        const plan = r.identity?.meta?.fields?.plan?.stringValue;
        return { ok: plan === "pro", seen: plan };
      });
    });
  });
}));
