/**
 * Rate-limit pools without a shared counter (FerretDB without Redis): the
 * server still serves, and says plainly that pools are per process — an
 * error-level start log line and the metric latchkey_ratelimit_pools_shared 0;
 * with Redis the metric is 1. Real server processes on MONGODB_URI.
 */
import { afterEach, expect, it } from "vitest";
import { dropMongoDatabase, startServer, uniqueName, type ServerProcess } from "../integration/support.js";
import { describeWith, isFerretDb, mongodbUri, redisUrl } from "./support.js";

describeWith("MONGODB_URI", isFerretDb() ? mongodbUri() : null, "rate-limit pools on FerretDB", () => {
  let server: ServerProcess | undefined;
  let database = "";
  afterEach(async () => {
    await server?.kill("SIGKILL");
    if (database) await dropMongoDatabase(database).catch(() => undefined);
  });

  const metric = async (s: ServerProcess) => {
    const text = await (await fetch(`http://127.0.0.1:${s.metricsPort}/metrics`)).text();
    return /^latchkey_ratelimit_pools_shared (\d)$/m.exec(text)?.[1];
  };

  it("says at start and in its metrics that pools are counted per process without Redis, and serves", async () => {
    database = uniqueName("lk_pools");
    server = await startServer({ metrics: true, env: { MONGODB_URI: mongodbUri()!, LATCHKEY_MONGODB_DATABASE: database } });
    const line = server
      .stdout()
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as { level: string; msg: string })
      .find((l) => /per process/.test(l.msg));
    expect(line, "an error-level line at start").toMatchObject({ level: "error" });
    expect(line!.msg).toMatch(/N instances admit N times a shared limit/);
    expect(line!.msg).toMatch(/LATCHKEY_REDIS_URL/);
    expect(await metric(server)).toBe("0");
    const health = await fetch(`${server.baseUrl}/grpc.health.v1.Health/Check`, { method: "POST", headers: { "content-type": "application/json" }, body: "{}" });
    expect(await health.json()).toEqual({ status: "SERVING" });
  });

  describeWith("REDIS_URL", redisUrl(), "with Redis", () => {
    it("reports shared pools, and says nothing of per-process pools", async () => {
      database = uniqueName("lk_pools");
      server = await startServer({ metrics: true, env: { MONGODB_URI: mongodbUri()!, LATCHKEY_MONGODB_DATABASE: database, LATCHKEY_REDIS_URL: redisUrl()! } });
      expect(server.stdout()).not.toMatch(/per process/);
      expect(await metric(server)).toBe("1");
    });
  });
});
