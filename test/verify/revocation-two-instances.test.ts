/**
 * Revocation across instances under load (issue 9): two real server processes
 * on one MongoDB database (FerretDB in CI) with Redis counters. Instance B
 * verifies a key with credits continuously from many concurrent calls while
 * instance A disables (or deletes) it; no call that started more than one
 * second after A acknowledged the change may answer VALID.
 *
 * Needs MONGODB_URI and REDIS_URL: skipped locally without them, failing in CI.
 */
import { afterEach, beforeEach, expect, it } from "vitest";
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
import { describeWith, mongodbUri, redisUrl, sleep } from "./support.js";

const VALID = "VERIFICATION_CODE_VALID";
/** Concurrent verification loops on instance B. */
const LOOPS = 32;
/** How long the load goes on after the change was acknowledged. */
const AFTER_MS = 3000;

describeWith("MONGODB_URI", mongodbUri(), "revocation under load, two server processes", () =>
  describeWith("REDIS_URL", redisUrl(), "with Redis counters", () => {
    let database = "";
    let rootKey = "";
    const servers: ServerProcess[] = [];
    const clients: GrpcClients[] = [];

    beforeEach(async () => {
      database = uniqueName("lk_revoke");
      const env = {
        MONGODB_URI: mongodbUri()!,
        LATCHKEY_MONGODB_DATABASE: database,
        LATCHKEY_REDIS_URL: redisUrl()!,
        LATCHKEY_METRICS_PORT: "0",
      };
      const created = await runCli(["root-keys", "create", "--name", "t", "--permission", "*"], env);
      expect(created.code, created.stderr).toBe(0);
      rootKey = (JSON.parse(created.stdout.trim().split("\n").pop()!) as { key: string }).key;
      for (let i = 0; i < 2; i++) {
        servers.push(await startServer({ env }));
        clients.push(grpcClients(servers[i].address));
      }
    });

    afterEach(async () => {
      for (const c of clients.splice(0)) c.close();
      await Promise.all(servers.splice(0).map((s) => s.kill("SIGKILL")));
      if (database) await dropMongoDatabase(database).catch(() => undefined);
    });

    const call = (i: number, service: "keys" | "identities", method: string, req: Msg) =>
      clients[i].call(clients[i][service], method, req, rootKey);

    /**
     * Runs LOOPS verification loops of `key` on B; `change` runs on A once the
     * load is under way. Returns every answer with its start time, and when A
     * acknowledged the change.
     */
    async function underLoad(key: string, change: () => Promise<unknown>) {
      const answers: { start: number; code: string }[] = [];
      let stopAt = Infinity;
      const loops = Array.from({ length: LOOPS }, async () => {
        while (Date.now() < stopAt) {
          const start = Date.now();
          try {
            const r = await call(1, "keys", "VerifyKey", { key });
            answers.push({ start, code: r.code as string });
          } catch (err) {
            answers.push({ start, code: `error: ${(err as Error).message}` });
          }
        }
      });
      // Some VALID answers first, so the key is cached and spends are in flight.
      while (answers.filter((a) => a.code === VALID).length < LOOPS * 2) await sleep(20);
      await change();
      const acked = Date.now();
      stopAt = acked + AFTER_MS;
      await Promise.all(loops);
      return { answers, acked };
    }

    it("answers no VALID for a key with credits that was disabled on the other instance more than 1 second before the call", async () => {
      const created = await call(0, "keys", "CreateKey", { api_id: "api_revoke", credits: { remaining: "1000000000" } });
      const { answers, acked } = await underLoad(created.plaintext, () =>
        call(0, "keys", "UpdateKey", { key: { id: created.key.id, enabled: false }, update_mask: { paths: ["enabled"] } }),
      );
      const late = answers.filter((a) => a.code === VALID && a.start > acked + 1000);
      const after = answers.filter((a) => a.start > acked + 1000);
      expect(after.length, "verifications more than 1 s after the disable").toBeGreaterThan(LOOPS);
      expect(after.every((a) => a.code === "VERIFICATION_CODE_DISABLED"), JSON.stringify(after.filter((a) => a.code !== "VERIFICATION_CODE_DISABLED").slice(0, 3))).toBe(true);
      expect(late.length, `VALID answers that started more than 1 s after the disable (last ${Math.max(0, ...late.map((a) => a.start - acked))} ms after)`).toBe(0);
    }, 60_000);

    it("answers no VALID for a key with shared identity credits that was deleted on the other instance more than 1 second before the call", async () => {
      const { identity } = await call(0, "identities", "CreateIdentity", { external_id: uniqueName("org"), credits: { remaining: "1000000000" } });
      const created = await call(0, "keys", "CreateKey", { api_id: "api_revoke", identity_id: identity.id });
      const { answers, acked } = await underLoad(created.plaintext, () => call(0, "keys", "DeleteKey", { id: created.key.id }));
      const after = answers.filter((a) => a.start > acked + 1000);
      expect(after.length).toBeGreaterThan(LOOPS);
      expect(after.filter((a) => a.code !== "VERIFICATION_CODE_NOT_FOUND").slice(0, 3)).toEqual([]);
    }, 60_000);
  }),
);
