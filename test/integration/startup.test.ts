/**
 * Integration tier: how the real process starts and refuses to start. A bad
 * setting stops it before it touches the store or a port, with exit code 2 and
 * a message naming the variable.
 */
import { existsSync } from "node:fs";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { runCli, startServer, tempDir, type ServerProcess } from "./support.js";

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
});
