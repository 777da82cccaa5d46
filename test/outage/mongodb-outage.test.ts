/**
 * A MongoDB outage at the wire (issue 13): a server process on a FerretDB of
 * the test's own, with Redis for rate-limit counters and credit balances (the
 * production setup), under a steady load of verifications. FerretDB is killed
 * (SIGKILL) and, a few seconds later, started again on the same data.
 *
 * Asserted, no timing: every verification of a cached key — with and without
 * credits, whose root key, key, identity and cache TTLs all run out during the
 * outage — answers VALID throughout; an uncached key and writes get UNAVAILABLE
 * while the store is gone and the writes leave nothing behind; health turns
 * NOT_SERVING and the metrics say the instance answers from its cache; after
 * the restart health turns SERVING by itself, the uncached key verifies, what
 * was acknowledged before the outage is there, and the usage counted and the
 * credits spent during the outage are in the store.
 *
 * A second instance spends credits from the store itself (no Redis balances):
 * its cached key with credits is refused with UNAVAILABLE during the outage
 * (nothing is spent, its rate-limit tokens are given back), its key without
 * credits keeps answering VALID.
 */
import { MongoClient } from "mongodb";
import { storedKeyDoc } from "../support/stored-key.js";
import { expect } from "vitest";
import {
  findTool,
  grpcClients,
  itWithTool,
  runCli,
  sleep,
  startServer,
  uniqueName,
  type GrpcClients,
  type Msg,
  type ServerProcess,
} from "../integration/support.js";
import { describeWith, redisUrl } from "../verify/support.js";
import { healthTurns, metric, outageFixtures, startFerretDb, statusOf, steadyLoad, tally, verifyOnce, type FerretDb, type Outcome } from "./support.js";

const since = (t: number) => ({ seconds: String(Math.floor(t / 1000)), nanos: 0 });
/** Short cache times, so that every cache entry in play outlives its TTL during the outage. */
const SHORT_CACHES = {
  LATCHKEY_ROOT_KEY_CACHE_MS: "1000",
  LATCHKEY_CACHE_TTL_MS: "2000",
  LATCHKEY_USAGE_FLUSH_MS: "200",
  LATCHKEY_CREDITS_FLUSH_MS: "200",
  LATCHKEY_HEALTH_CHECK_INTERVAL_MS: "500",
};
/** Long enough for the caches above to run out. */
const OUTAGE_MS = 4000;

interface Node {
  server: ServerProcess;
  c: GrpcClients;
  rootKey: string;
  call(service: "keys" | "identities", method: string, req: Msg): Promise<Msg>;
}

describeWith("REDIS_URL", redisUrl(), "a MongoDB outage under load", () => {
  const started = outageFixtures();

  async function node(ferret: FerretDb, env: Record<string, string>): Promise<Node> {
    const database = uniqueName("lk_outage");
    started.databases.push(database);
    const full = { MONGODB_URI: ferret.uri, LATCHKEY_MONGODB_DATABASE: database, ...SHORT_CACHES, ...env };
    const created = await runCli(["root-keys", "create", "--name", "t", "--permission", "*"], full);
    expect(created.code, created.stderr).toBe(0);
    const rootKey = (JSON.parse(created.stdout.trim().split("\n").pop()!) as { key: string }).key;
    const server = await startServer({ env: full, metrics: true });
    started.servers.push(server);
    const c = grpcClients(server.address);
    started.clients.push(c);
    return { server, c, rootKey, call: (service, method, req) => c.call(c[service], method, req, rootKey) };
  }

  const ferretdb = findTool("ferretdb");
  itWithTool(
    ferretdb,
    "ferretdb",
    "keeps verifying cached keys, refuses what needs the store at once, loses nothing and recovers by itself",
    async (bin) => {
      const ferret = (started.ferret = await startFerretDb(bin));
      // R: the production setup (counters and balances in Redis). S: credits spent in the store.
      const r = await node(ferret, { LATCHKEY_REDIS_URL: redisUrl()! });
      const s = await node(ferret, { LATCHKEY_CREDITS_BACKEND: "store" });
      const t0 = Date.now();

      // Windows are aligned to multiples of their duration: a 30-day one (the longest) is not crossed during the test,
      // where an hour's was (a run at 19:59 counted the tokens of the new window only).
      const pool = [{ name: "requests", limit: "100000", duration: { seconds: String(30 * 86_400) }, auto_apply: true }];
      const setUp = async (n: Node) => {
        const identity = (await n.call("identities", "CreateIdentity", { external_id: uniqueName("org"), meta: { plan: "pro" }, ratelimits: pool })).identity;
        const create = async (req: Msg) => {
          const res = await n.call("keys", "CreateKey", { api_id: "api_outage", identity_id: identity.id, ...req });
          return { id: res.key.id as string, plaintext: res.plaintext as string };
        };
        return { plain: await create({ name: "plain" }), credited: await create({ name: "credited", credits: { remaining: "100000" } }), uncached: await create({ name: "uncached" }) };
      };
      const rk = await setUp(r);
      const sk = await setUp(s);
      // Every answer each node gave, one by one or under load.
      const seen = new Map<Node, Outcome[]>([
        [r, []],
        [s, []],
      ]);
      const once = async (n: Node, name: string, key: string) => {
        const o = await verifyOnce(n.c, n.rootKey, name, key);
        seen.get(n)!.push(o);
        return o.result;
      };
      const validOf = (n: Node, name: string) => seen.get(n)!.filter((o) => o.key === name && o.result === "VALID").length;

      // Acknowledged before the outage, so it must be there after it.
      await r.call("keys", "UpdateKey", { key: { id: rk.plain.id, name: "renamed before" }, update_mask: { paths: ["name"] } });
      // Cached: each key verified once (on R, the balance is then held in Redis).
      for (const [n, k] of [[r, rk], [s, sk]] as const) {
        expect(await once(n, "plain", k.plain.plaintext)).toBe("VALID");
        expect(await once(n, "credited", k.credited.plaintext)).toBe("VALID");
      }

      const loadR = steadyLoad(r.c, r.rootKey, { plain: rk.plain.plaintext, credited: rk.credited.plaintext }, 4);
      const loadS = steadyLoad(s.c, s.rootKey, { plain: sk.plain.plaintext }, 2);
      while (loadR.count() < 50) await sleep(20);

      await ferret.kill();
      const killedAt = Date.now();
      await healthTurns(r.c, "NOT_SERVING");
      await healthTurns(s.c, "NOT_SERVING");
      // Past the root key's cache time (1 s), checked before the outage.
      await sleep(1000);

      // Cached keys answer; what needs the store is refused with UNAVAILABLE.
      expect(await once(r, "plain", rk.plain.plaintext)).toBe("VALID");
      expect(await once(r, "credited", rk.credited.plaintext)).toBe("VALID");
      expect(await once(r, "uncached", rk.uncached.plaintext)).toBe("error:UNAVAILABLE");
      const refused = async (p: Promise<unknown>) => {
        try {
          await p;
          return "OK";
        } catch (err) {
          return statusOf(err);
        }
      };
      expect(await refused(r.call("keys", "CreateKey", { api_id: "api_outage", name: "created during the outage" }))).toBe("UNAVAILABLE");
      expect(await refused(r.call("keys", "UpdateKey", { key: { id: rk.plain.id, name: "renamed during" }, update_mask: { paths: ["name"] } }))).toBe("UNAVAILABLE");
      expect(await refused(r.call("keys", "UpdateCredits", { key_id: rk.credited.id, operation: "CREDITS_OPERATION_SET", value: "5" }))).toBe("UNAVAILABLE");
      expect(await refused(r.call("keys", "GetKey", { id: rk.plain.id }))).toBe("UNAVAILABLE");
      // S spends credits in the store: its cached key with credits is refused (nothing spent, its limit tokens given back).
      expect(await once(s, "credited", sk.credited.plaintext)).toBe("error:UNAVAILABLE");

      // The instance says it answers from its cache.
      expect((await metric(r.server.metricsPort!, "latchkey_store_reachable")).get("")).toBe(0);
      expect((await metric(r.server.metricsPort!, "latchkey_cache_stale_answers_total")).get('{cache="key"}') ?? 0).toBeGreaterThan(0);

      // Let every cache time run out while the load goes on, then bring the store back.
      while (Date.now() - killedAt < OUTAGE_MS) await sleep(100);
      const duringOutage = loadR.count();
      await ferret.start();
      await healthTurns(r.c, "SERVING");
      await healthTurns(s.c, "SERVING");
      while (loadR.count() < duringOutage + 50) await sleep(20);
      const outcomesR = await loadR.stop();
      const outcomesS = await loadS.stop();
      seen.get(r)!.push(...outcomesR);
      seen.get(s)!.push(...outcomesS);

      // Cached keys answered VALID throughout, before, during and after the outage.
      expect(tally(outcomesR)).toEqual({ VALID: outcomesR.length });
      expect(tally(outcomesS)).toEqual({ VALID: outcomesS.length });
      expect(outcomesR.filter((o) => o.at > killedAt && o.at < killedAt + OUTAGE_MS).length, "answers during the outage").toBeGreaterThan(0);

      // Back by itself: the uncached key verifies; S spends its credits again.
      expect(await once(r, "uncached", rk.uncached.plaintext)).toBe("VALID");
      // S's refused verification took no token of the identity's pool: what is left counts VALID answers only.
      const afterOnS = await s.call("keys", "VerifyKey", { key: sk.credited.plaintext });
      expect(afterOnS.code).toBe("VERIFICATION_CODE_VALID");
      const validOnS = validOf(s, "plain") + validOf(s, "credited") + 1;
      expect(Number((afterOnS.ratelimits as Msg[])[0].remaining)).toBe(100_000 - validOnS);
      // Nothing refused was written; what was acknowledged before is there.
      const listed = await r.call("keys", "ListKeys", { api_id: "api_outage", page_size: 100 });
      expect((listed.keys as Msg[]).map((k) => k.name).sort()).toEqual(["credited", "renamed before", "uncached"]);

      // Usage counted during the outage is in the store (written once it was back).
      const expectUsage = async (n: Node, keyId: string, valid: number) => {
        for (let i = 0; ; i++) {
          const usage = await n.call("keys", "GetKeyUsage", { id: keyId, start_time: since(t0 - 86_400_000), granularity: "GRANULARITY_DAY" });
          if (Number(usage.totals.valid) === valid || i >= 50) {
            expect(Number(usage.totals.valid), `usage of ${keyId}`).toBe(valid);
            return;
          }
          await sleep(100);
        }
      };
      await expectUsage(r, rk.plain.id, validOf(r, "plain"));
      await expectUsage(r, rk.credited.id, validOf(r, "credited"));
      await expectUsage(r, rk.uncached.id, validOf(r, "uncached"));
      await expectUsage(s, sk.plain.id, validOf(s, "plain"));
      await expectUsage(s, sk.credited.id, validOf(s, "credited") + 1);

      // Credits spent from Redis during the outage are in MongoDB once written back (a graceful stop writes the rest).
      await r.server.stop();
      await s.server.stop();
      started.servers.splice(0);
      const client = new MongoClient(ferret.uri);
      try {
        const stored = async (database: string, id: string) =>
          (await storedKeyDoc<{ _id: string; credits: { remaining: number } }>(client, database, id))!.credits.remaining;
        expect(await stored(started.databases[0], rk.credited.id)).toBe(100_000 - validOf(r, "credited"));
        // S's refused verification spent nothing.
        expect(await stored(started.databases[1], sk.credited.id)).toBe(100_000 - validOf(s, "credited") - 1);
      } finally {
        await client.close();
      }
    },
    120_000,
  );
});
