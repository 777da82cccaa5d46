/**
 * Harness for the integration tier: the real server process (`node dist/src/cli.js
 * serve`) on port 0 with its own data directory, and the external tools the
 * tests drive it with.
 *
 * Every process started here is killed by `stop()`/`kill()` (tests call them in
 * afterAll), by an exit hook if a test file ends without that, and finally by the
 * global teardown (./global-setup.ts), which reaps any pid still listed in
 * LATCHKEY_IT_PIDS_DIR — for a worker that was killed outright.
 */
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { execFileSync, spawn, spawnSync, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, rmdirSync, statSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { it } from "vitest";

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
export const CLI = path.join(REPO, "dist/src/cli.js");
export const PROTO_DIR = path.join(REPO, "proto");
export const IN_CI = !!process.env.CI;

const START_TIMEOUT_MS = 20_000;
const STOP_TIMEOUT_MS = 15_000;

// ---------------------------------------------------------------------------
// dist/ must match src/: `npm test` builds first; a direct `vitest run` rebuilds
// here when any input is newer than the last build.

const BUILD_INPUTS = ["src", "gen", "bench", "tsconfig.json", "tsconfig.build.json", "package.json"];

function newestMtime(p: string): number {
  if (!existsSync(p)) return 0;
  const st = statSync(p);
  if (!st.isDirectory()) return st.mtimeMs;
  let newest = st.mtimeMs;
  for (const e of readdirSync(p)) newest = Math.max(newest, newestMtime(path.join(p, e)));
  return newest;
}

function distIsFresh(): boolean {
  if (!existsSync(CLI)) return false;
  const built = statSync(CLI).mtimeMs;
  return BUILD_INPUTS.every((p) => newestMtime(path.join(REPO, p)) <= built);
}

/** Builds dist/ once if it is missing or older than its sources; test files in parallel wait for one build. */
export async function ensureBuilt(): Promise<void> {
  if (distIsFresh()) return;
  const lock = path.join(tmpdir(), `latchkey-build-${Buffer.from(REPO).toString("hex").slice(-32)}.lock`);
  const deadline = Date.now() + 180_000;
  for (;;) {
    try {
      mkdirSync(lock);
      break;
    } catch {
      // Another worker is building; a lock older than the deadline is a crashed build.
      if (existsSync(lock) && Date.now() - statSync(lock).mtimeMs > 180_000) rmSync(lock, { recursive: true, force: true });
      if (Date.now() > deadline) throw new Error(`timed out waiting for the build lock ${lock}`);
      await sleep(250);
    }
  }
  try {
    if (distIsFresh()) return;
    const res = spawnSync(process.execPath, [path.join(REPO, "node_modules/typescript/bin/tsc"), "-p", "tsconfig.build.json"], {
      cwd: REPO,
      encoding: "utf8",
      timeout: 170_000,
    });
    if (res.status !== 0) throw new Error(`npm run build failed:\n${res.stdout}${res.stderr}${res.error ?? ""}`);
  } finally {
    rmdirSync(lock);
  }
}

// ---------------------------------------------------------------------------
// Process bookkeeping: nothing outlives the test run.

const children = new Set<ChildProcess>();
const PIDS_DIR = process.env.LATCHKEY_IT_PIDS_DIR;

/** Remembers a child; `marker` (a string of its command line) lets the global teardown recognise it. */
function track(proc: ChildProcess, marker: string): void {
  killAllOnExit();
  children.add(proc);
  const pidFile = PIDS_DIR && proc.pid ? path.join(PIDS_DIR, String(proc.pid)) : null;
  if (pidFile) writeFileSync(pidFile, marker);
  proc.once("exit", () => {
    children.delete(proc);
    if (pidFile) rmSync(pidFile, { force: true });
  });
}

let exitHook = false;

/** Last resort for a test file that ends without its afterAll: SIGKILL whatever is still running. */
function killAllOnExit(): void {
  if (exitHook) return;
  exitHook = true;
  process.once("exit", () => {
    for (const c of children) {
      try {
        c.kill("SIGKILL");
      } catch {
        // already gone
      }
    }
  });
}

// ---------------------------------------------------------------------------
// The server process.

export interface ExitInfo {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface ServerProcess {
  proc: ChildProcess;
  port: number;
  /** "127.0.0.1:PORT", for gRPC clients. */
  address: string;
  /** "http://127.0.0.1:PORT", for Connect over HTTP/1.1. */
  baseUrl: string;
  metricsPort: number | null;
  /** The bootstrap root key, when this start created one (first start on a fresh store), read from the file it wrote. */
  bootstrapKey: string | null;
  dataDir: string;
  /** Everything the process wrote so far. */
  stdout(): string;
  stderr(): string;
  /** Resolves when the process has exited. */
  exited: Promise<ExitInfo>;
  /** SIGTERM (graceful) and wait; SIGKILL if it does not exit in time. */
  stop(): Promise<ExitInfo>;
  /** Sends `signal` and waits for the exit. */
  kill(signal: NodeJS.Signals): Promise<ExitInfo>;
}

export interface StartOptions {
  /** Reuse a data directory (restarts); default: a new temporary one. */
  dataDir?: string;
  /** Serve /metrics on a free port (LATCHKEY_METRICS_PORT=0 turns metrics off). */
  metrics?: boolean;
  /** Extra environment, e.g. MONGODB_URI and LATCHKEY_MONGODB_DATABASE. */
  env?: Record<string, string>;
  args?: string[];
}

const tempDirs: string[] = [];

/** A new temporary directory, removed when the test process exits. */
export function tempDir(label: string): string {
  if (tempDirs.length === 0) {
    process.once("exit", () => {
      for (const d of tempDirs) rmSync(d, { recursive: true, force: true });
    });
  }
  const d = mkdtempSync(path.join(tmpdir(), `latchkey-it-${label}-`));
  tempDirs.push(d);
  return d;
}

/** The test process's environment minus every Latchkey and MongoDB setting, so CI's MONGODB_URI does not leak into embedded runs. */
function baseEnv(): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (v === undefined || k.startsWith("LATCHKEY_") || k === "MONGODB_URI" || k === "NODE_OPTIONS") continue;
    env[k] = v;
  }
  return env;
}

/** A port that was free a moment ago (for the metrics port, which has no "pick one" setting). */
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

export interface RawRun extends ExitInfo {
  stdout: string;
  stderr: string;
}

/** Runs the CLI to completion (config errors, root-keys commands). */
export async function runCli(args: string[], env: Record<string, string> = {}, timeoutMs = 20_000): Promise<RawRun> {
  await ensureBuilt();
  const proc = spawn(process.execPath, [CLI, ...args], { cwd: REPO, env: { ...baseEnv(), ...env }, stdio: ["ignore", "pipe", "pipe"] });
  track(proc, CLI);
  let stdout = "";
  let stderr = "";
  proc.stdout!.setEncoding("utf8").on("data", (d: string) => (stdout += d));
  proc.stderr!.setEncoding("utf8").on("data", (d: string) => (stderr += d));
  const timer = setTimeout(() => proc.kill("SIGKILL"), timeoutMs);
  const exit = await new Promise<ExitInfo>((resolve) => proc.once("close", (code, signal) => resolve({ code, signal })));
  clearTimeout(timer);
  return { ...exit, stdout, stderr };
}

/** Starts `node dist/src/cli.js serve` on 127.0.0.1, port 0; resolves once it logs "latchkey listening". */
export async function startServer(opts: StartOptions = {}): Promise<ServerProcess> {
  await ensureBuilt();
  for (let attempt = 1; ; attempt++) {
    try {
      return await startOnce(opts);
    } catch (err) {
      // The metrics port comes from freePort(); another process may take it first.
      if (attempt < 3 && opts.metrics && /EADDRINUSE/.test(String(err))) continue;
      throw err;
    }
  }
}

async function startOnce(opts: StartOptions): Promise<ServerProcess> {
  const dataDir = opts.dataDir ?? tempDir("data");
  const env = {
    ...baseEnv(),
    LATCHKEY_HOST: "127.0.0.1",
    LATCHKEY_PORT: "0",
    LATCHKEY_METRICS_PORT: opts.metrics ? String(await freePort()) : "0",
    LATCHKEY_DATA_DIR: dataDir,
    LATCHKEY_LOG_LEVEL: "info",
    LATCHKEY_SHUTDOWN_GRACE_MS: "2000",
    LATCHKEY_HEALTH_CHECK_INTERVAL_MS: "500",
    ...opts.env,
  };
  const proc = spawn(process.execPath, [CLI, "serve", ...(opts.args ?? [])], { cwd: REPO, env, stdio: ["ignore", "pipe", "pipe"] });
  track(proc, CLI);
  let out = "";
  let err = "";
  const exited = new Promise<ExitInfo>((resolve) => proc.once("exit", (code, signal) => resolve({ code, signal })));
  proc.stderr!.setEncoding("utf8").on("data", (d: string) => (err += d));

  const listening = new Promise<{ port: number; metricsPort: number | null }>((resolve, reject) => {
    let partial = "";
    proc.stdout!.setEncoding("utf8").on("data", (d: string) => {
      out += d;
      partial += d;
      const lines = partial.split("\n");
      partial = lines.pop()!;
      for (const line of lines) {
        if (!line.startsWith("{")) continue;
        try {
          const rec = JSON.parse(line) as { msg?: string; port?: number; metricsPort?: number | null };
          if (rec.msg === "latchkey listening" && typeof rec.port === "number") resolve({ port: rec.port, metricsPort: rec.metricsPort ?? null });
        } catch {
          // not a log line
        }
      }
    });
    void exited.then((e) => reject(new Error(`server exited before listening (${JSON.stringify(e)})\nstdout:\n${out}\nstderr:\n${err}`)));
    setTimeout(() => reject(new Error(`server did not log "latchkey listening" within ${START_TIMEOUT_MS} ms\nstdout:\n${out}\nstderr:\n${err}`)), START_TIMEOUT_MS).unref();
  });

  let ports;
  try {
    ports = await listening;
  } catch (e) {
    proc.kill("SIGKILL");
    await exited;
    throw e;
  }

  // A server that dies on its own explains every failure after it: show why.
  let stopping = false;
  void exited.then((e) => {
    if (!stopping) {
      process.stderr.write(
        `latchkey server on port ${ports.port} exited unexpectedly (${JSON.stringify(e)})\n--- stdout (tail)\n${out.slice(-4000)}\n--- stderr (tail)\n${err.slice(-4000)}\n`,
      );
    }
  });

  const kill = async (signal: NodeJS.Signals): Promise<ExitInfo> => {
    stopping = true;
    if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
    const timer = setTimeout(() => proc.kill("SIGKILL"), STOP_TIMEOUT_MS);
    const info = await exited;
    clearTimeout(timer);
    return info;
  };

  // A fresh install writes its bootstrap root key to a file (0600) and logs where, before "latchkey listening".
  const written = /"file":("[^"]*"),"msg":"bootstrap root key written"/.exec(out.split("latchkey listening")[0]);
  const bootstrap = written ? /^lkroot_[1-9A-HJ-NP-Za-km-z]+$/.exec(readFileSync(path.resolve(REPO, JSON.parse(written[1]) as string), "utf8").trim()) : null;
  return {
    proc,
    port: ports.port,
    address: `127.0.0.1:${ports.port}`,
    baseUrl: `http://127.0.0.1:${ports.port}`,
    metricsPort: ports.metricsPort,
    bootstrapKey: bootstrap ? bootstrap[0] : null,
    dataDir,
    stdout: () => out,
    stderr: () => err,
    exited,
    stop: () => kill("SIGTERM"),
    kill,
  };
}

// ---------------------------------------------------------------------------
// MongoDB (FerretDB in CI): one database per test, dropped afterwards.

export const MONGODB_URI = process.env.MONGODB_URI ?? "";

export function uniqueName(prefix: string): string {
  return `${prefix}_${Date.now().toString(36)}_${randomBytes(4).toString("hex")}`;
}

/** Drops a server's database and its companion databases (src/storage/mongodb/key-layout.ts). */
export async function dropMongoDatabase(name: string): Promise<void> {
  const { MongoClient } = await import("mongodb");
  const { storeDatabases } = await import("../../src/storage/mongodb/key-layout.js");
  const client = new MongoClient(MONGODB_URI, { serverSelectionTimeoutMS: 10_000 });
  try {
    for (const db of storeDatabases(name)) await client.db(db).dropDatabase();
  } finally {
    await client.close();
  }
}

// ---------------------------------------------------------------------------
// External tools: found on PATH, then in Go's bin directory. Missing locally → the
// test is skipped; missing in CI (CI is set) → the test fails.

export function findTool(name: string, extra: string[] = []): string | null {
  try {
    const p = execFileSync("which", [name], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] }).trim();
    if (p) return p;
  } catch {
    // not on PATH
  }
  const gobin = process.env.GOBIN;
  const gopath = process.env.GOPATH ?? path.join(process.env.HOME ?? "/root", "go");
  for (const dir of [...extra, gobin, path.join(gopath, "bin"), "/root/go/bin"]) {
    if (dir && existsSync(path.join(dir, name))) return path.join(dir, name);
  }
  return null;
}

/** `it` for a test that needs an external tool: runs with it, skips without it locally, fails without it in CI. */
export function itWithTool<T>(tool: T | null, toolName: string, name: string, fn: (tool: T) => Promise<void>, timeout?: number): void {
  if (tool !== null) it(name, () => fn(tool), timeout);
  else if (IN_CI) it(name, () => Promise.reject(new Error(`${toolName} is required in CI but was not found (.ci/run installs it)`)));
  else it.skip(`${name} (${toolName} not installed)`, () => undefined);
}

/** Python 3 with grpcio-tools importable, or null. */
export function findPython(): string | null {
  for (const candidate of [process.env.PYTHON, "python3"]) {
    if (!candidate) continue;
    const res = spawnSync(candidate, ["-c", "import grpc, grpc_tools.protoc"], { stdio: "ignore" });
    if (res.status === 0) return candidate;
  }
  return null;
}

export interface ToolRun {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a command to completion with bounded time; never rejects on a non-zero exit. */
export function run(cmd: string, args: string[], opts: { input?: string; timeoutMs?: number; cwd?: string; env?: NodeJS.ProcessEnv } = {}): Promise<ToolRun> {
  return new Promise((resolve, reject) => {
    const proc = spawn(cmd, args, { cwd: opts.cwd ?? REPO, env: opts.env ?? process.env, stdio: ["pipe", "pipe", "pipe"] });
    track(proc, cmd);
    let stdout = "";
    let stderr = "";
    proc.stdout!.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    proc.stderr!.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    proc.once("error", reject);
    const timer = setTimeout(() => proc.kill("SIGKILL"), opts.timeoutMs ?? 20_000);
    proc.once("close", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
    // A tool that reads no input (grpc-health-probe) may exit before the end of
    // its stdin is written: EPIPE there is no failure — its exit code and output
    // are the result. Any other stdin error is.
    proc.stdin!.on("error", (err: NodeJS.ErrnoException) => {
      if (err.code !== "EPIPE") reject(err);
    });
    proc.stdin!.end(opts.input ?? "");
  });
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

// ---------------------------------------------------------------------------
// The reference native client: @grpc/grpc-js with the service definitions loaded
// from proto/ at run time (no generated code involved).

const PROTO_FILES = ["latchkey/v1/identity_service.proto", "latchkey/v1/key_service.proto", "grpc/health/v1/health.proto"];

/** Messages as @grpc/proto-loader decodes them: snake_case fields, int64 and enums as strings. */
export type Msg = Record<string, any>;

type Unary = (req: Msg, md: grpc.Metadata, opts: grpc.CallOptions, cb: (err: grpc.ServiceError | null, res: Msg) => void) => grpc.ClientUnaryCall;

export interface GrpcClients {
  identities: grpc.Client;
  keys: grpc.Client;
  health: grpc.Client;
  /** One unary call; `rootKey` null sends no authorization. Rejects with the grpc.ServiceError. */
  call(client: grpc.Client, method: string, req: Msg, rootKey: string | null): Promise<Msg>;
  close(): void;
}

let packageDefinition: protoLoader.PackageDefinition | null = null;

export function grpcClients(address: string): GrpcClients {
  packageDefinition ??= protoLoader.loadSync(PROTO_FILES, {
    includeDirs: [PROTO_DIR],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const pkg = grpc.loadPackageDefinition(packageDefinition) as any;
  const creds = grpc.credentials.createInsecure();
  const identities: grpc.Client = new pkg.latchkey.v1.IdentityService(address, creds);
  const keys: grpc.Client = new pkg.latchkey.v1.KeyService(address, creds);
  const health: grpc.Client = new pkg.grpc.health.v1.Health(address, creds);
  return {
    identities,
    keys,
    health,
    call(client, method, req, rootKey) {
      const md = new grpc.Metadata();
      if (rootKey !== null) md.set("authorization", `Bearer ${rootKey}`);
      const fn = (client as unknown as Record<string, Unary>)[method];
      if (typeof fn !== "function") throw new Error(`no method ${method}`);
      return new Promise((resolve, reject) => {
        fn.call(client, req, md, { deadline: Date.now() + 10_000 }, (err, res) => (err ? reject(err) : resolve(res)));
      });
    },
    close() {
      identities.close();
      keys.close();
      health.close();
    },
  };
}

/** The error a call rejected with (fails the test if it resolved). */
export async function grpcError(p: Promise<unknown>): Promise<grpc.ServiceError> {
  try {
    await p;
  } catch (err) {
    return err as grpc.ServiceError;
  }
  throw new Error("expected the call to fail, but it succeeded");
}
