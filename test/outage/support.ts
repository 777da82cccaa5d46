/**
 * Helpers for the store-outage tests: a FerretDB process of the test's own that
 * can be killed and started again on the same data (the MongoDB store's
 * outage), and what the tests watch a server with during one — its health
 * (grpc.health.v1 Check), its metrics, and a steady load of verifications.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { rmSync, writeFileSync } from "node:fs";
import path from "node:path";
import { MongoClient } from "mongodb";
import { afterEach } from "vitest";
import { dropMongoDatabase, freePort, sleep, tempDir, type GrpcClients, type Msg, type ServerProcess } from "../integration/support.js";

export interface FerretDb {
  /** mongodb://127.0.0.1:PORT/ — the same across restarts. */
  readonly uri: string;
  readonly port: number;
  /** SIGKILL, and wait for the exit. */
  kill(): Promise<void>;
  /** Starts it again on the same port and data (unless it runs); resolves once it answers a ping. */
  start(): Promise<void>;
}

const live = new Set<ChildProcess>();
let hooked = false;

/** A FerretDB (SQLite backend, as .ci/run starts it) on a free port with a data directory of its own. */
export async function startFerretDb(bin: string): Promise<FerretDb> {
  if (!hooked) {
    hooked = true;
    process.once("exit", () => live.forEach((p) => p.kill("SIGKILL")));
  }
  const dir = tempDir("ferretdb");
  const port = await freePort();
  const uri = `mongodb://127.0.0.1:${port}/`;
  let proc: ChildProcess | null = null;
  let exited: Promise<void> = Promise.resolve();

  const start = async () => {
    if (proc && proc.exitCode === null && proc.signalCode === null) return;
    const args = [
      "--handler=sqlite",
      `--sqlite-url=file:${dir}/`,
      `--state-dir=${dir}`,
      `--listen-addr=127.0.0.1:${port}`,
      `--debug-addr=127.0.0.1:${await freePort()}`,
      "--telemetry=disable",
      "--log-level=warn",
    ];
    const p = spawn(bin, args, { stdio: "ignore" });
    proc = p;
    live.add(p);
    // The integration teardown reaps what a killed test worker left (test/integration/global-setup.ts).
    const pidFile = process.env.LATCHKEY_IT_PIDS_DIR && p.pid ? path.join(process.env.LATCHKEY_IT_PIDS_DIR, String(p.pid)) : null;
    if (pidFile) writeFileSync(pidFile, bin);
    exited = new Promise((resolve) =>
      p.once("exit", () => {
        live.delete(p);
        if (pidFile) rmSync(pidFile, { force: true });
        resolve();
      }),
    );
    for (let i = 0; ; i++) {
      const client = new MongoClient(uri, { serverSelectionTimeoutMS: 500 });
      try {
        await client.db("admin").command({ ping: 1 });
        return;
      } catch (err) {
        if (i >= 60 || p.exitCode !== null) throw new Error(`FerretDB did not answer on ${uri}: ${(err as Error).message}`);
        await sleep(250);
      } finally {
        await client.close();
      }
    }
  };
  await start();
  return {
    uri,
    port,
    async kill() {
      proc?.kill("SIGKILL");
      await exited;
    },
    start,
  };
}

/** The server's health (service ""): "SERVING", "NOT_SERVING", or the error's message. */
export async function healthOf(c: GrpcClients): Promise<string> {
  try {
    return (await c.call(c.health, "Check", { service: "" }, null)).status as string;
  } catch (err) {
    return (err as Error).message;
  }
}

/** Polls health every 50 ms until it is `want`; how long that took (throws past `deadlineMs`). */
export async function healthTurns(c: GrpcClients, want: "SERVING" | "NOT_SERVING", deadlineMs = 20_000): Promise<number> {
  const started = Date.now();
  for (;;) {
    const seen = await healthOf(c);
    if (seen === want) return Date.now() - started;
    if (Date.now() - started > deadlineMs) throw new Error(`health did not turn ${want} within ${deadlineMs} ms; it is ${seen}`);
    await sleep(50);
  }
}

/** Values of one metric from a Prometheus text page, by its label string ("" without labels). */
export async function metric(metricsPort: number, name: string): Promise<Map<string, number>> {
  const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
  const out = new Map<string, number>();
  for (const m of text.matchAll(new RegExp(`^${name}(\\{[^}]*\\})? (\\S+)$`, "gm"))) out.set(m[1] ?? "", Number(m[2]));
  return out;
}

/** One call's outcome: the verification code, or the gRPC status name of its error. */
export interface Outcome {
  key: string;
  /** "VALID", "USAGE_EXCEEDED", … or "error:UNAVAILABLE", … */
  result: string;
  at: number;
  ms: number;
}

const STATUS = ["OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"];

/** The gRPC status name of a failed call. */
export function statusOf(err: unknown): string {
  const code = (err as { code?: number }).code;
  return typeof code === "number" ? (STATUS[code] ?? String(code)) : String(err);
}

/** Verifies `key` once: its outcome. */
export async function verifyOnce(c: GrpcClients, rootKey: string, name: string, key: string, req: Msg = {}): Promise<Outcome> {
  const started = Date.now();
  try {
    const res = await c.call(c.keys, "VerifyKey", { key, ...req }, rootKey);
    return { key: name, result: String(res.code).replace("VERIFICATION_CODE_", ""), at: started, ms: Date.now() - started };
  } catch (err) {
    return { key: name, result: `error:${statusOf(err)}`, at: started, ms: Date.now() - started };
  }
}

/**
 * `workers` callers verifying the named keys in turn until stopped; every
 * outcome is kept, in order.
 */
export function steadyLoad(c: GrpcClients, rootKey: string, keys: Record<string, string>, workers: number) {
  const outcomes: Outcome[] = [];
  let running = true;
  const names = Object.keys(keys);
  const loops = Array.from({ length: workers }, async (_, w) => {
    for (let i = w; running; i++) {
      const name = names[i % names.length];
      outcomes.push(await verifyOnce(c, rootKey, name, keys[name]));
      // A call that fails at once must not starve the event loop.
      await new Promise((r) => setImmediate(r));
    }
  });
  return {
    outcomes,
    /** Outcomes seen so far. */
    count: () => outcomes.length,
    async stop(): Promise<Outcome[]> {
      running = false;
      await Promise.all(loops);
      return outcomes;
    },
  };
}

/** How many of `outcomes` had each result. */
export function tally(outcomes: Outcome[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const o of outcomes) out[o.result] = (out[o.result] ?? 0) + 1;
  return out;
}

/**
 * What an outage test starts — servers, clients, its own FerretDB and the
 * databases on it — stopped after each test (FerretDB started again if the test
 * left it down, so the databases can be dropped).
 */
export function outageFixtures() {
  const started: { servers: ServerProcess[]; clients: GrpcClients[]; ferret: FerretDb | null; databases: string[] } = { servers: [], clients: [], ferret: null, databases: [] };
  afterEach(async () => {
    for (const c of started.clients.splice(0)) c.close();
    await Promise.all(started.servers.splice(0).map((s) => s.kill("SIGKILL")));
    if (started.ferret) {
      await started.ferret.start().catch(() => undefined);
      for (const d of started.databases.splice(0)) await dropMongoDatabase(d).catch(() => undefined);
      await started.ferret.kill();
      started.ferret = null;
    }
  });
  return started;
}
