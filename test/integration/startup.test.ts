/**
 * Integration tier: how the real process starts and refuses to start. A bad
 * setting stops it before it touches the store or a port, with exit code 2 and
 * a message naming the variable.
 */
import { existsSync } from "node:fs";
import http from "node:http";
import net from "node:net";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { dropMongoDatabase, grpcClients, IN_CI, MONGODB_URI, runCli, sleep, startServer, tempDir, uniqueName, type ServerProcess } from "./support.js";

describe("configuration fails fast", () => {
  it.each([
    [{ LATCHKEY_PORT: "abc" }, "LATCHKEY_PORT"],
    [{ LATCHKEY_PORT: "70000" }, "LATCHKEY_PORT"],
    [{ LATCHKEY_METRICS_PORT: "-1" }, "LATCHKEY_METRICS_PORT"],
    [{ LATCHKEY_STORE: "postgres" }, "LATCHKEY_STORE"],
    [{ LATCHKEY_STORE: "mongodb" }, "MONGODB_URI"],
    [{ MONGODB_URI: "http://localhost:27017" }, "MONGODB_URI"],
    [{ LATCHKEY_LOG_LEVEL: "loud" }, "LATCHKEY_LOG_LEVEL"],
  ])("exits 2 naming the variable for %o", async (bad, variable) => {
    const dataDir = path.join(tempDir("cfg"), "never-created");
    const res = await runCli(["serve"], { LATCHKEY_HOST: "127.0.0.1", LATCHKEY_PORT: "0", LATCHKEY_METRICS_PORT: "0", LATCHKEY_DATA_DIR: dataDir, ...bad });
    expect(res.code).toBe(2);
    expect(res.stderr).toContain(variable);
    expect(res.stdout).not.toMatch(/lkroot_|latchkey listening/);
    expect(existsSync(dataDir), "the store is not opened").toBe(false);
  });

  it("exits 2 naming the flag for an unknown flag", async () => {
    const res = await runCli(["serve", "--no-such-flag", "1"], { LATCHKEY_PORT: "0", LATCHKEY_METRICS_PORT: "0", LATCHKEY_DATA_DIR: tempDir("cfg") });
    expect(res.code).toBe(2);
    expect(res.stderr).toContain("--no-such-flag");
  });

  it("takes flags over the environment", async () => {
    const res = await runCli(["serve", "--port", "not-a-port"], { LATCHKEY_PORT: "0", LATCHKEY_METRICS_PORT: "0", LATCHKEY_DATA_DIR: tempDir("cfg") });
    expect(res.code).toBe(2);
    expect(res.stderr).toContain("LATCHKEY_PORT");
  });
});

describe("a port already in use", () => {
  let first: ServerProcess | undefined;
  afterAll(async () => {
    if (first) expect(await first.stop()).toEqual({ code: 0, signal: null });
  });

  it("makes the second process exit non-zero naming the address", async () => {
    first = await startServer();
    const res = await runCli(["serve"], { LATCHKEY_HOST: "127.0.0.1", LATCHKEY_PORT: String(first.port), LATCHKEY_METRICS_PORT: "0", LATCHKEY_DATA_DIR: tempDir("busy") });
    expect(res.code).not.toBe(0);
    expect(res.code).not.toBeNull();
    expect(res.stderr).toContain("EADDRINUSE");
    expect(res.stderr).toContain(`127.0.0.1:${first.port}`);
  });

  it("keeps a fresh install's bootstrap root key for the start that can listen", async () => {
    first ??= await startServer();
    const dataDir = tempDir("busy-fresh");
    const refused = await runCli(["serve"], { LATCHKEY_HOST: "127.0.0.1", LATCHKEY_PORT: String(first.port), LATCHKEY_METRICS_PORT: "0", LATCHKEY_DATA_DIR: dataDir });
    expect(refused.code).toBe(1);
    expect(refused.stdout, "no key is shown by a process that cannot serve").not.toMatch(/lkroot_/);
    const next = await startServer({ dataDir });
    try {
      expect(next.bootstrapKey).toMatch(/^lkroot_/);
    } finally {
      expect(await next.stop()).toEqual({ code: 0, signal: null });
    }
  });
});

/** A TCP proxy to MongoDB that can stop forwarding: a server that stopped answering, sockets still open. */
async function freezableProxy(target: URL): Promise<{ uri: string; freeze(): void; close(): void }> {
  let frozen = false;
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(target.port || 27017), target.hostname);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on("error", () => s.destroy());
      s.on("close", () => sockets.delete(s));
    }
    client.on("data", (d) => frozen || upstream.write(d));
    upstream.on("data", (d) => frozen || client.write(d));
    client.on("close", () => upstream.destroy());
    upstream.on("close", () => client.destroy());
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as net.AddressInfo;
  return {
    uri: `mongodb://127.0.0.1:${port}/?directConnection=true`,
    freeze: () => (frozen = true),
    close: () => {
      server.close();
      for (const s of sockets) s.destroy();
    },
  };
}

describe("graceful stop", () => {
  const mongoTest = MONGODB_URI ? it : IN_CI ? it : it.skip;
  mongoTest("stops within its grace periods when the store stops answering, logging the usage counts it lost", async () => {
    if (!MONGODB_URI) throw new Error("MONGODB_URI must be set in CI (.ci/run starts FerretDB)");
    const proxy = await freezableProxy(new URL(MONGODB_URI));
    const database = uniqueName("lk_it_frozen");
    const server = await startServer({
      env: { LATCHKEY_STORE: "mongodb", MONGODB_URI: proxy.uri, LATCHKEY_MONGODB_DATABASE: database, LATCHKEY_USAGE_FLUSH_MS: "60000", LATCHKEY_SHUTDOWN_GRACE_MS: "1500", LATCHKEY_LOG_LEVEL: "debug" },
    });
    const c = grpcClients(server.address);
    try {
      const root = server.bootstrapKey!;
      const created = await c.call(c.keys, "CreateKey", { api_id: "api_frozen", name: "k" }, root);
      const verified = await c.call(c.keys, "VerifyKey", { key: created.plaintext, api_id: "api_frozen" }, root);
      expect(verified.valid).toBe(true);
      proxy.freeze();
      // Let the change-feed poll and the health check start their (now unanswered) reads.
      await sleep(1000);
      // stop() SIGKILLs after 15 s: a clean exit means the frozen store did not hold the process.
      expect(await server.stop(), server.stdout().slice(-3000)).toEqual({ code: 0, signal: null });
      const lost = server
        .stdout()
        .split("\n")
        .filter((l) => l.startsWith("{"))
        .map((l) => JSON.parse(l) as { msg?: string; lostEntries?: number })
        .find((l) => l.msg === "could not write the last usage counts; they are lost");
      // One verification: its minute row (the store derives the hour and day rows).
      expect(lost?.lostEntries).toBe(1);
    } finally {
      c.close();
      proxy.close();
      await dropMongoDatabase(database);
    }
  }, 40_000);


  it("does not wait out the grace period for an idle HTTP/1.1 keep-alive connection", async () => {
    // A grace period far longer than the test: only closing idle connections lets it exit in time.
    const server = await startServer({ env: { LATCHKEY_SHUTDOWN_GRACE_MS: "60000" } });
    const agent = new http.Agent({ keepAlive: true });
    try {
      const status = await new Promise<number>((resolve, reject) => {
        const req = http.request(`${server.baseUrl}/grpc.health.v1.Health/Check`, { method: "POST", agent, headers: { "content-type": "application/json" } }, (res) => {
          res.resume();
          res.on("end", () => resolve(res.statusCode ?? 0));
        });
        req.on("error", reject);
        req.end("{}");
      });
      expect(status).toBe(200);
      expect(Object.values(agent.freeSockets).flat().length, "the connection is kept open, idle").toBe(1);
      // stop() sends SIGTERM and SIGKILLs after 15 s: a clean exit means it did not wait out the grace.
      expect(await server.stop()).toEqual({ code: 0, signal: null });
    } finally {
      agent.destroy();
    }
  }, 45_000);
});
