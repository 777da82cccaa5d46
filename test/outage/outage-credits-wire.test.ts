/**
 * Credits admitted on trust through a MongoDB outage, at the wire: a server
 * process on a FerretDB of the test's own, credits spent in the store
 * (LATCHKEY_CREDITS_BACKEND=store) with LATCHKEY_OUTAGE_CREDIT_ALLOWANCE=5.
 * FerretDB is killed and started again on the same data.
 *
 * Asserted, no timing: with the store gone a cached key's spends are admitted
 * up to the allowance (each answer's balance counting down from the last known
 * one), the next is UNAVAILABLE; the metric counts them; once FerretDB is back
 * the instance charges exactly what it admitted, once, by itself, and the key
 * goes on from the charged balance.
 */
import { storedKeyDoc } from "../support/stored-key.js";
import { MongoClient } from "mongodb";
import { expect } from "vitest";
import { findTool, grpcClients, itWithTool, runCli, sleep, startServer, uniqueName, type Msg } from "../integration/support.js";
import { healthTurns, metric, outageFixtures, startFerretDb, statusOf } from "./support.js";

const started = outageFixtures();

itWithTool(
  findTool("ferretdb"),
  "ferretdb",
  "admits a cached key's spends up to the allowance while MongoDB is down, refuses the next, and charges exactly those once it is back",
  async (bin) => {
    const ferret = (started.ferret = await startFerretDb(bin));
    const database = uniqueName("lk_trust");
    started.databases.push(database);
    const env = {
      MONGODB_URI: ferret.uri,
      LATCHKEY_MONGODB_DATABASE: database,
      LATCHKEY_CREDITS_BACKEND: "store",
      LATCHKEY_OUTAGE_CREDIT_ALLOWANCE: "5",
      LATCHKEY_HEALTH_CHECK_INTERVAL_MS: "500",
    };
    const created = await runCli(["root-keys", "create", "--name", "t", "--permission", "*"], env);
    expect(created.code, created.stderr).toBe(0);
    const rootKey = (JSON.parse(created.stdout.trim().split("\n").pop()!) as { key: string }).key;
    const server = await startServer({ env, metrics: true });
    started.servers.push(server);
    const c = grpcClients(server.address);
    started.clients.push(c);
    const call = (service: "keys" | "identities", method: string, req: Msg) => c.call(c[service], method, req, rootKey);
    const verify = async (key: string): Promise<string> => {
      try {
        const res = await call("keys", "VerifyKey", { key });
        return `${String(res.code).replace("VERIFICATION_CODE_", "")} ${res.credits_remaining ?? res.creditsRemaining}`;
      } catch (err) {
        return `error:${statusOf(err)}`;
      }
    };

    const res = await call("keys", "CreateKey", { api_id: "api_trust", credits: { remaining: "100" } });
    const key = { id: res.key.id as string, plaintext: res.plaintext as string };
    expect(await verify(key.plaintext)).toBe("VALID 99");

    await ferret.kill();
    await healthTurns(c, "NOT_SERVING");
    const during: string[] = [];
    for (let i = 0; i < 6; i++) during.push(await verify(key.plaintext));
    expect(during).toEqual(["VALID 98", "VALID 97", "VALID 96", "VALID 95", "VALID 94", "error:UNAVAILABLE"]);
    expect((await metric(server.metricsPort!, "latchkey_outage_credits_admitted_total")).get("")).toBe(5);

    await ferret.start();
    await healthTurns(c, "SERVING");
    // The instance charges what it admitted by itself once the store answers: wait for it (bounded), then check it is exact.
    let remaining = NaN;
    for (let i = 0; i < 100; i++) {
      remaining = Number((await call("keys", "GetKey", { id: key.id })).key.credits.remaining);
      if (remaining !== 99) break;
      await sleep(100);
    }
    expect(remaining).toBe(94);
    expect((await metric(server.metricsPort!, "latchkey_outage_credits_uncharged_total")).get("")).toBe(0);
    expect(await verify(key.plaintext)).toBe("VALID 93");

    // Charged once: after a graceful stop the stored balance is what the answers said.
    await server.stop();
    started.servers.splice(0);
    const client = new MongoClient(ferret.uri);
    try {
      const doc = await storedKeyDoc<{ _id: string; credits: { remaining: number } }>(client, database, key.id);
      expect(doc!.credits.remaining).toBe(93);
    } finally {
      await client.close();
    }
  },
  120_000,
);
