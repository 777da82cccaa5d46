import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import net from "node:net";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { MongoClient } from "mongodb";

/*
 * The processes a benchmark starts: FerretDB of its own, Latchkey servers, Go
 * tools. Every child is killed when the benchmark exits, however it exits.
 */

const ROOT = new URL("../..", import.meta.url).pathname;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Every child still running; killed on exit. */
export const children = new Set<ChildProcess>();
process.on("exit", () => children.forEach((c) => c.kill("SIGKILL")));
for (const signal of ["SIGINT", "SIGTERM"] as const) process.on(signal, () => process.exit(1));

/** A Go tool on PATH or in $(go env GOPATH)/bin. */
export function findBinary(name: string): string {
  const onPath = spawnSync("sh", ["-c", `command -v ${name}`], { encoding: "utf8" }).stdout.trim();
  if (onPath) return onPath;
  const gopath = spawnSync("go", ["env", "GOPATH"], { encoding: "utf8" }).stdout?.trim() || join(process.env.HOME ?? "/root", "go");
  const p = join(gopath, "bin", name);
  if (existsSync(p)) return p;
  throw new Error(`${name} not found: bash .ci/run installs it`);
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

/** FerretDB (SQLite backend, the flags of .ci/run) on `port` with its data in `dir`; resolves once it answers. */
export async function startFerretDb(dir: string, port: number): Promise<ChildProcess> {
  const proc = spawn(
    findBinary("ferretdb"),
    ["--handler=sqlite", `--sqlite-url=file:${dir}/`, `--state-dir=${dir}`, `--listen-addr=127.0.0.1:${port}`, `--debug-addr=127.0.0.1:${await freePort()}`, "--telemetry=disable", "--log-level=warn"],
    { stdio: "ignore" },
  );
  children.add(proc);
  await answering(port);
  return proc;
}

/** Resolves once FerretDB on `port` answers a ping (tried every 50 ms, each try given 500 ms). */
export async function answering(port: number): Promise<void> {
  for (let i = 0; ; i++) {
    const probe = new MongoClient(`mongodb://127.0.0.1:${port}/`, { serverSelectionTimeoutMS: 500 });
    try {
      await probe.db("admin").command({ ping: 1 });
      return;
    } catch (err) {
      if (i > 100) throw err;
      await sleep(50);
    } finally {
      await probe.close();
    }
  }
}

function dataDir(): string {
  const d = mkdtempSync(join(tmpdir(), "latchkey-bench-data-"));
  dataDirs.push(d);
  return d;
}

/** Data directories of the servers started here (bootstrap root key files), removed when the benchmark exits. */
const dataDirs: string[] = [];
process.on("exit", () => dataDirs.forEach((d) => rmSync(d, { recursive: true, force: true })));

/** A Latchkey server of this checkout's build with `env`; resolves with its port once it listens. */
export function startLatchkey(env: Record<string, string>): Promise<{ proc: ChildProcess; port: number }> {
  const proc = spawn(process.execPath, ["dist/src/cli.js", "serve"], {
    cwd: ROOT,
    // LATCHKEY_DATA_DIR: a server on MongoDB writes its bootstrap root key there — a temporary directory, not the checkout's data/.
    env: { ...process.env, LATCHKEY_PORT: "0", LATCHKEY_METRICS_PORT: "0", LATCHKEY_LOG_LEVEL: "info", LATCHKEY_DATA_DIR: dataDir(), ...env },
    stdio: ["ignore", "pipe", "inherit"],
  });
  children.add(proc);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("latchkey did not start")), 30_000);
    proc.once("exit", (code) => reject(new Error(`latchkey exited with ${code}`)));
    createInterface({ input: proc.stdout! }).on("line", (line) => {
      if (process.env.BENCH_VERBOSE) process.stderr.write(`server: ${line}\n`);
      const m = /"port":(\d+).*"msg":"latchkey listening"/.exec(line);
      if (m) {
        clearTimeout(timer);
        resolve({ proc, port: Number(m[1]) });
      }
    });
  });
}
