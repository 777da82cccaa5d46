/**
 * Faults across instances (CI: FerretDB + Redis): two server processes verify
 * concurrently against one identity's shared credits and another identity's
 * shared pool; instance A reaches the store (and Redis) through proxies that
 * delay everything it sends; an UpdateCredits INCREMENT is acknowledged by A;
 * then A is killed with SIGKILL while one of its spends is on the wire (held by
 * the proxy), and B carries on alone until the balance is used up (how much of
 * it is left at the kill depends on how fast the slowed A is beside B). Once B has stopped gracefully (writing
 * balances back), the stored balance must account for every VALID answer and
 * the increment: never more VALID than the balance or the pool allows, never
 * below zero, nothing acknowledged lost. Meanwhile a third key (credits of its
 * own) is verified on both instances and disabled through B while A, slowed by
 * its proxies, still serves it: no call on either instance that started more
 * than one second after the disable was acknowledged may answer VALID. Once per
 * credits backend (redis: the default with Redis; store: the lease lock, which
 * B must take over from the dead A). The figures are printed.
 */
import { MongoClient } from "mongodb";
import { afterEach, describe, expect, it } from "vitest";
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
import { isMongoCommand, startTcpProxy, type TcpProxy } from "../support/tcp-proxy.js";
import { describeWith, mongodbUri, redisUrl } from "./support.js";

const BALANCE = 150;
const INCREMENT = 100;
const POOL = 120;
const CALLS = 400; // per identity, over both instances
const MAX_CREDIT_CALLS = 2_000; // on the shared balance, should B never see it used up
const WORKERS = 6; // concurrent callers per instance

type Outcome = {
  identity: "credits" | "pool" | "revoked";
  instance: "A" | "B";
  code: string | null;
  resetAt: string | null;
  error: string | null;
  /** When the call was sent, and when its answer came. */
  start: number;
  at: number;
};

describeWith("MONGODB_URI", mongodbUri(), "faults across two instances", () =>
  describeWith("REDIS_URL", redisUrl(), "on MongoDB and Redis", () => {
    const started: { servers: ServerProcess[]; proxies: TcpProxy[]; clients: GrpcClients[]; database: string } = {
      servers: [],
      proxies: [],
      clients: [],
      database: "",
    };
    afterEach(async () => {
      for (const c of started.clients.splice(0)) c.close();
      await Promise.all(started.servers.splice(0).map((s) => s.kill("SIGKILL")));
      for (const p of started.proxies.splice(0)) await p.close();
      if (started.database) await dropMongoDatabase(started.database).catch(() => undefined);
    });

    for (const backend of ["redis", "store"] as const) {
      describe(`credits backend ${backend}`, () => {
        it("never admits more than the balance or the pool, never goes below zero, loses nothing acknowledged, when an instance is killed mid-spend", async () => {
          const mongo = new URL(mongodbUri()!);
          const redis = new URL(redisUrl()!);
          const mongoProxy = await startTcpProxy({ host: mongo.hostname, port: Number(mongo.port || 27017) });
          const redisProxy = await startTcpProxy({ host: redis.hostname, port: Number(redis.port || 6379) });
          started.proxies.push(mongoProxy, redisProxy);
          mongoProxy.delayMs = 2;
          redisProxy.delayMs = 2;

          const database = (started.database = uniqueName("lk_fault"));
          const common = { LATCHKEY_MONGODB_DATABASE: database, LATCHKEY_CREDITS_BACKEND: backend, LATCHKEY_CREDITS_FLUSH_MS: "200" };
          const direct = { ...common, MONGODB_URI: mongodbUri()!, LATCHKEY_REDIS_URL: redisUrl()! };
          const viaProxies = { ...common, MONGODB_URI: `mongodb://${mongoProxy.address}/?directConnection=true`, LATCHKEY_REDIS_URL: `redis://${redisProxy.address}` };
          const created = await runCli(["root-keys", "create", "--name", "t", "--permission", "*"], direct);
          expect(created.code, created.stderr).toBe(0);
          const rootKey = (JSON.parse(created.stdout.trim().split("\n").pop()!) as { key: string }).key;
          const a = await startServer({ env: viaProxies });
          const b = await startServer({ env: direct });
          started.servers.push(a, b);
          const clients = { A: grpcClients(a.address), B: grpcClients(b.address) };
          started.clients.push(clients.A, clients.B);
          const call = (i: "A" | "B", method: string, req: Msg) => clients[i].call(clients[i].keys, method, req, rootKey);

          // One identity with shared credits, one with a shared pool; three keys each.
          const identity = async (req: Msg) => (await clients.B.call(clients.B.identities, "CreateIdentity", { external_id: uniqueName("org"), ...req }, rootKey)).identity;
          const creditsId = await identity({ credits: { remaining: String(BALANCE) } });
          const poolId = await identity({ ratelimits: [{ name: "requests", limit: String(POOL), duration: { seconds: "3600" }, auto_apply: true }] });
          const keysOf = async (identityId: string) =>
            Promise.all([0, 1, 2].map(async () => (await call("B", "CreateKey", { api_id: "api_fault", identity_id: identityId })).plaintext as string));
          const revoked = await call("B", "CreateKey", { api_id: "api_fault", credits: { remaining: "1000000000" } });
          const keys = { credits: await keysOf(creditsId.id), pool: await keysOf(poolId.id), revoked: [revoked.plaintext as string] };

          const outcomes: Outcome[] = [];
          const issued = { credits: 0, pool: 0 };
          let aDead = false;
          let killedAt = 0;
          let incremented = false;
          let killedMidSpend = false;
          let allIssued: Promise<void> | null = null;
          let issuedAll: (() => void) | null = null;
          let revokedAt = 0;

          // The pool gets CALLS calls. The shared balance gets at least CALLS, and more until B has
          // answered USAGE_EXCEEDED to a call sent after A's kill (at most MAX_CREDIT_CALLS): how much
          // of the balance is spent before the increment depends on how fast A (slowed by its proxies)
          // is beside B, and B must use up what A left.
          let exhaustedAfterKill = false;
          /** Set with the increment: when A, not caught mid-spend by then, is killed all the same. */
          let enoughIssued = () => false;
          const done = (which: "credits" | "pool") =>
            issued[which] >= CALLS && (which === "pool" || exhaustedAfterKill || issued.credits >= MAX_CREDIT_CALLS);
          const worker = async (instance: "A" | "B", n: number) => {
            for (let i = n; ; i++) {
              if (instance === "A" && aDead) return;
              // First the revocation phase: every call verifies the key to be disabled, until a
              // second and a half after the disable; then the shared credits and pool (and that key).
              const revocationPhase = revokedAt === 0 || Date.now() < revokedAt + 1500;
              const which = revocationPhase ? "revoked" : (["credits", "pool", "revoked"] as const)[i % 3];
              if (which !== "revoked" && done(which)) {
                if (done("credits") && done("pool")) return;
                continue;
              }
              if (which !== "revoked") issued[which]++;
              if (enoughIssued()) issuedAll?.();
              const start = Date.now();
              try {
                const res = await call(instance, "VerifyKey", { key: keys[which][i % keys[which].length] });
                const limit = (res.ratelimits as Msg[])[0];
                outcomes.push({ identity: which, instance, code: res.code, resetAt: limit ? String(limit.reset_at?.seconds) : null, error: null, start, at: Date.now() });
                if (which === "credits" && instance === "B" && killedAt > 0 && start > killedAt && res.code === "VERIFICATION_CODE_USAGE_EXCEEDED") exhaustedAfterKill = true;
              } catch (err) {
                outcomes.push({ identity: which, instance, code: null, resetAt: null, error: (err as Error).message, start, at: Date.now() });
              }
            }
          };

          // A killer: after A has answered a while and acknowledged the increment,
          // hold A's next spend on the wire and kill A while it is held.
          const killer = (async () => {
            // The revocation first, through B, while A (slowed by its proxies) serves the key too;
            // A goes on serving for over a second after it before it is killed.
            while (outcomes.filter((o) => o.instance === "A" && o.identity === "revoked" && o.code === "VERIFICATION_CODE_VALID").length < 10) {
              await new Promise((r) => setTimeout(r, 5));
            }
            await call("B", "UpdateKey", { key: { id: revoked.key.id, enabled: false }, update_mask: { paths: ["enabled"] } });
            revokedAt = Date.now();
            while (outcomes.filter((o) => o.instance === "A" && o.identity !== "revoked" && o.code).length < 60) await new Promise((r) => setTimeout(r, 5));
            await call("A", "UpdateCredits", { identity_id: creditsId.id, operation: "CREDITS_OPERATION_INCREMENT", value: String(INCREMENT) });
            incremented = true;
            const callsAtIncrement = issued.credits;
            enoughIssued = () => issued.pool >= CALLS && issued.credits >= Math.max(CALLS, callsAtIncrement + 3 * INCREMENT);
            const spendOnTheWire =
              backend === "redis"
                ? redisProxy.holdWhen((chunk) => chunk.includes(`:cr:i:${creditsId.id}`))
                : mongoProxy.holdWhen((chunk) => isMongoCommand(chunk, "update", "identities"));
            // (Should the callers finish first, A is killed all the same.)
            let finish!: () => void;
            allIssued = new Promise<void>((r) => (finish = r));
            issuedAll = finish;
            if (enoughIssued()) finish();
            killedMidSpend = await Promise.race([spendOnTheWire.then(() => true), allIssued.then(() => false)]);
            aDead = true;
            killedAt = Date.now();
            await a.kill("SIGKILL");
          })();

          await Promise.all([
            ...Array.from({ length: WORKERS }, (_, n) => worker("A", n)),
            ...Array.from({ length: WORKERS }, (_, n) => worker("B", n)),
            killer,
          ]);
          expect(incremented).toBe(true);

          // B stops gracefully: the balances (its own and A's) are written back.
          await b.stop();
          started.servers.splice(started.servers.indexOf(b), 1);
          const client = new MongoClient(mongodbUri()!);
          const stored = (await client.db(database).collection<{ _id: string; credits: { remaining: number } }>("identities").findOne({ _id: creditsId.id }))!;
          await client.close();

          const of = (id: Outcome["identity"]) => outcomes.filter((o) => o.identity === id);
          const valid = (id: Outcome["identity"]) => of(id).filter((o) => o.code === "VERIFICATION_CODE_VALID");
          const unknown = (id: Outcome["identity"]) => of(id).filter((o) => o.error !== null);
          const total = BALANCE + INCREMENT;
          const remaining = stored.credits.remaining;
          const perWindow = new Map<string, number>();
          for (const o of valid("pool")) perWindow.set(o.resetAt!, (perWindow.get(o.resetAt!) ?? 0) + 1);
          const resumed = valid("credits").find((o) => o.instance === "B" && o.at > killedAt);
          // Revocation: VALID answers to calls sent after the disable was acknowledged, per instance.
          const validAfterRevoke = valid("revoked").filter((o) => o.start > revokedAt);
          const worstDelay = Math.max(0, ...validAfterRevoke.map((o) => o.start - revokedAt));
          const servedAfter = (i: "A" | "B") => of("revoked").filter((o) => o.instance === i && o.code && o.start > revokedAt + 1000).length;
          // Printed, and named in every assertion below: CI shows only the end of a failing run's output.
          const figures =
            `[fault test, credits backend ${backend}] credits: ${valid("credits").length} VALID of ${of("credits").length} calls ` +
              `(${unknown("credits").length} without an answer: A killed), balance ${total} → stored ${remaining}; ` +
              `pool: ${valid("pool").length} VALID of ${of("pool").length} (limit ${POOL} per window, per window: ${[...perWindow.values()].join(", ")}); ` +
              `B answered ${outcomes.filter((o) => o.instance === "B").length}, A ${outcomes.filter((o) => o.instance === "A" && o.code).length} before its kill; ` +
              `A killed ${killedMidSpend ? "while its spend was held on the wire" : "after the callers finished"}; ` +
              `B's first VALID on the shared balance ${resumed ? resumed.at - killedAt : "—"} ms after the kill; ` +
              `revocation: the last VALID for the disabled key was sent ${worstDelay} ms after the disable was acknowledged ` +
              `(${validAfterRevoke.length} VALID sent after it; answers to calls sent over 1 s after it: A ${servedAfter("A")}, B ${servedAfter("B")}, all DISABLED)\n`;
          process.stdout.write(figures);

          // Revoked stays revoked: no VALID for a call sent over a second after the disable, on either instance.
          expect(worstDelay, `ms between the acknowledged disable and the last VALID call sent; ${figures}`).toBeLessThanOrEqual(1000);
          expect(servedAfter("A"), `A served the disabled key for over a second after the disable; ${figures}`).toBeGreaterThan(0);
          expect(of("revoked").filter((o) => o.code && o.start > revokedAt + 1000 && o.code !== "VERIFICATION_CODE_DISABLED"), figures).toEqual([]);
          // Never more VALID than the balance (with the acknowledged increment) or the pool.
          expect(valid("credits").length, figures).toBeLessThanOrEqual(total);
          for (const n of perWindow.values()) expect(n, figures).toBeLessThanOrEqual(POOL);
          // Never below zero.
          expect(remaining, figures).toBeGreaterThanOrEqual(0);
          // Nothing acknowledged lost: every VALID answer and the increment are in the
          // balance; only calls that got no answer may or may not have spent.
          expect(remaining, figures).toBeLessThanOrEqual(total - valid("credits").length);
          expect(remaining, figures).toBeGreaterThanOrEqual(total - valid("credits").length - unknown("credits").length);
          // The balance was used up: B went on after A died.
          expect(remaining, figures).toBe(0);
          expect(of("credits").some((o) => o.code === "VERIFICATION_CODE_USAGE_EXCEEDED"), figures).toBe(true);
          expect(of("pool").some((o) => o.code === "VERIFICATION_CODE_RATE_LIMITED"), figures).toBe(true);
        }, 180_000);
      });
    }
  }),
);
