/**
 * Integration tier: where a fresh install's bootstrap root key goes. Logs are
 * JSON lines on stdout that a log shipper keeps forever, so the key goes to a
 * file in LATCHKEY_DATA_DIR readable by its owner only, and never into a log line.
 */
import { mkdirSync, readFileSync, statSync } from "node:fs";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { grpcClients, startServer, tempDir, type ServerProcess } from "./support.js";

const ROOT_KEY = /lkroot_[1-9A-HJ-NP-Za-km-z]+/;

/**
 * stderr once it holds `what`: the server writes it before its "listening" log
 * line, but stdout and stderr are separate pipes, so stderr's bytes may reach
 * the test after stdout's. Waits for them (at most 10 s), then returns stderr.
 */
async function stderrWith(server: ServerProcess, what: string | RegExp): Promise<string> {
  const has = () => (typeof what === "string" ? server.stderr().includes(what) : what.test(server.stderr()));
  for (let i = 0; i < 1000 && !has(); i++) await new Promise((r) => setTimeout(r, 10));
  return server.stderr();
}

describe("the bootstrap root key of a fresh install", () => {
  let server: ServerProcess | undefined;
  afterEach(async () => {
    if (server) expect(await server.stop()).toEqual({ code: 0, signal: null });
    server = undefined;
  });

  it("is written to a file only its owner can read, and appears in no log line nor on stderr", async () => {
    server = await startServer();
    const file = path.join(server.dataDir, "bootstrap-root-key");
    const key = readFileSync(file, "utf8").trim();
    expect(key).toMatch(new RegExp(`^${ROOT_KEY.source}$`));
    expect(statSync(file).mode & 0o777).toBe(0o600);
    expect(server.stdout()).not.toMatch(ROOT_KEY);
    expect(await stderrWith(server, file), "stderr tells where the key is").toContain(file);
    expect(server.stderr()).not.toMatch(ROOT_KEY);
    const logged = server
      .stdout()
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as { msg: string; file?: string });
    expect(logged.find((l) => l.msg === "bootstrap root key written")?.file).toBe(file);

    const c = grpcClients(server.address);
    try {
      const res = await c.call(c.keys, "CreateKey", { api_id: "api_boot" }, key);
      expect(res.plaintext).toBeTruthy();
    } finally {
      c.close();
    }
  });

  it("is created once: a restart on the same data writes no new key", async () => {
    const first = await startServer();
    const file = path.join(first.dataDir, "bootstrap-root-key");
    const key = readFileSync(file, "utf8");
    expect(await first.stop()).toEqual({ code: 0, signal: null });
    server = await startServer({ dataDir: first.dataDir });
    expect(server.bootstrapKey).toBeNull();
    expect(server.stderr()).not.toContain("bootstrap");
    expect(readFileSync(file, "utf8")).toBe(key);
  });

  it("goes to stderr, still outside the log stream, when the file cannot be written", async () => {
    const dataDir = tempDir("boot-blocked");
    // A directory where the file should be: the rename onto it fails.
    mkdirSync(path.join(dataDir, "bootstrap-root-key"));
    server = await startServer({ dataDir });
    expect(server.bootstrapKey).toBeNull();
    const key = ROOT_KEY.exec(await stderrWith(server, ROOT_KEY))?.[0];
    expect(key, "the key is printed on stderr").toBeDefined();
    expect(server.stdout()).not.toMatch(ROOT_KEY);
    expect(server.stdout()).toContain("cannot write the bootstrap root key file");
    const c = grpcClients(server.address);
    try {
      await c.call(c.keys, "CreateKey", { api_id: "api_boot" }, key!);
    } finally {
      c.close();
    }
  });
});
