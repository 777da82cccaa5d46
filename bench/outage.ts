import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { answering, children, findBinary, freePort, startFerretDb, startLatchkey } from "./processes.js";

/*
 * npm run bench:outage — a MongoDB outage under load (issue 13). Not part of
 * the tests: it reports times and latencies.
 *
 * Starts a FerretDB of its own (SQLite backend, temporary directory; the binary
 * from PATH or `go env GOPATH`/bin) and one Latchkey instance on it (rate-limit
 * counters and credit balances in Redis when REDIS_URL is set, as in
 * production), creates BENCH_OUTAGE_KEYS [200] keys — half of them with
 * credits — and verifies each once, so they are cached. Then ghz drives
 * VerifyKey over those keys at BENCH_OUTAGE_RPS [400] calls/s (10 workers)
 * for BENCH_OUTAGE_BEFORE_S [10] s, FerretDB is killed (SIGKILL) for
 * BENCH_OUTAGE_S [30] s and started again on the same data — or, with
 * BENCH_OUTAGE_HOW=stop, stopped (SIGSTOP: connections hang instead of being
 * refused, as behind a lost network) and continued — and the load goes on for
 * BENCH_OUTAGE_AFTER_S [10] s. Meanwhile a health Watch stream times
 * the health transitions, and every 200 ms during the outage one VerifyKey of
 * a key never verified (uncached) and one CreateKey time how long a call that
 * needs the store takes to fail.
 *
 * Reports: p50 / p99 / max of the cached verifications before, during and
 * after the outage (and during it without its first 2 s, the detection),
 * errors in each phase; time from the kill to NOT_SERVING and from the restart
 * (FerretDB spawned) to SERVING; time to fail an uncached verification and a
 * write.
 */
const KEYS = Number(process.env.BENCH_OUTAGE_KEYS ?? 200);
const RPS = Number(process.env.BENCH_OUTAGE_RPS ?? 400);
const BEFORE_S = Number(process.env.BENCH_OUTAGE_BEFORE_S ?? 10);
const OUTAGE_S = Number(process.env.BENCH_OUTAGE_S ?? 30);
const AFTER_S = Number(process.env.BENCH_OUTAGE_AFTER_S ?? 10);
const REDIS = process.env.REDIS_URL ?? "";
/** `kill`: FerretDB is killed (SIGKILL: connections refused) and started again; `stop`: it is stopped (SIGSTOP: connections hang, nothing answers) and continued (SIGCONT). */
const HOW = process.env.BENCH_OUTAGE_HOW ?? "kill";
if (HOW !== "kill" && HOW !== "stop") throw new Error("BENCH_OUTAGE_HOW must be kill or stop");
const ROOT = new URL("../..", import.meta.url).pathname;
const progress = (msg: string) => process.stderr.write(`bench:outage: ${msg}\n`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));






async function kill(proc: ChildProcess): Promise<void> {
  const exited = new Promise((r) => proc.once("exit", r));
  proc.kill("SIGKILL");
  await exited;
  children.delete(proc);
}


type Msg = Record<string, any>;

function clients(address: string) {
  const def = protoLoader.loadSync(["latchkey/v1/key_service.proto", "grpc/health/v1/health.proto"], {
    includeDirs: [join(ROOT, "proto")],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const pkg = grpc.loadPackageDefinition(def) as any;
  const creds = grpc.credentials.createInsecure();
  return { keys: new pkg.latchkey.v1.KeyService(address, creds), health: new pkg.grpc.health.v1.Health(address, creds) };
}

function unary(client: any, method: string, req: Msg, rootKey: string): Promise<Msg> {
  const md = new grpc.Metadata();
  md.set("authorization", `Bearer ${rootKey}`);
  return new Promise((resolve, reject) => client[method](req, md, { deadline: Date.now() + 20_000 }, (err: Error | null, res: Msg) => (err ? reject(err) : resolve(res))));
}

/** Health transitions as they stream in: [time, status]. */
function watchHealth(health: any): { seen: [number, string][]; stop(): void } {
  const seen: [number, string][] = [];
  const call = health.Watch({ service: "" });
  call.on("data", (m: Msg) => seen.push([Date.now(), m.status]));
  call.on("error", () => undefined);
  return { seen, stop: () => call.cancel() };
}

const pct = (sorted: number[], p: number) => (sorted.length ? sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)] : NaN);
const f = (n: number) => (Number.isFinite(n) ? n.toFixed(2) : "–");

async function main() {
  const dir = mkdtempSync(join(tmpdir(), "latchkey-outage-"));
  try {
    const mongoPort = await freePort();
    let ferret = await startFerretDb(dir, mongoPort);
    const env: Record<string, string> = {
      MONGODB_URI: `mongodb://127.0.0.1:${mongoPort}/`,
      LATCHKEY_MONGODB_DATABASE: "bench_outage",
      LATCHKEY_DATA_DIR: dir,
      ...(REDIS ? { LATCHKEY_REDIS_URL: REDIS } : { LATCHKEY_CREDITS_BACKEND: "store" }),
    };
    const server = await startLatchkey(env);
    const rootKey = readFileSync(join(dir, "bootstrap-root-key"), "utf8").trim();
    const c = clients(`127.0.0.1:${server.port}`);
    progress(`latchkey on ${server.port}, FerretDB on ${mongoPort}${REDIS ? `, Redis ${REDIS}` : ", credits in the store (no REDIS_URL)"}`);

    // Keys, each verified once: cached.
    const keys: string[] = [];
    for (let i = 0; i < KEYS; i++) {
      const res = await unary(c.keys, "CreateKey", { api_id: "api_bench", name: `k${i}`, ...(i % 2 ? { credits: { remaining: "100000000" } } : {}) }, rootKey);
      keys.push(res.plaintext as string);
    }
    const uncached = (await unary(c.keys, "CreateKey", { api_id: "api_bench", name: "uncached" }, rootKey)).plaintext as string;
    for (const k of keys) await unary(c.keys, "VerifyKey", { key: k }, rootKey);
    // With credits spent in the store, only the keys without credits can answer during the outage.
    const loadKeys = REDIS ? keys : keys.filter((_, i) => i % 2 === 0);
    const dataFile = join(dir, "verify.json");
    writeFileSync(dataFile, JSON.stringify(loadKeys.map((key) => ({ key }))));

    const health = watchHealth(c.health);
    const total = BEFORE_S + OUTAGE_S + AFTER_S;
    progress(`ghz: ${RPS}/s over ${loadKeys.length} cached keys for ${total} s; the store goes away after ${BEFORE_S} s for ${OUTAGE_S} s`);
    const ghzStarted = Date.now();
    const ghz = spawn(
      findBinary("ghz"),
      [
        "--insecure",
        "--proto", join(ROOT, "proto/latchkey/v1/key_service.proto"),
        "--import-paths", join(ROOT, "proto"),
        "--call", "latchkey.v1.KeyService.VerifyKey",
        "--data-file", dataFile,
        "--metadata", JSON.stringify({ authorization: `Bearer ${rootKey}` }),
        "-c", "10",
        "--rps", String(RPS),
        "-z", `${total}s`,
        "--format", "json",
        `127.0.0.1:${server.port}`,
      ],
      { stdio: ["ignore", "pipe", "inherit"] },
    );
    children.add(ghz);
    let ghzOut = "";
    ghz.stdout!.setEncoding("utf8").on("data", (d: string) => (ghzOut += d));
    const ghzDone = new Promise((r) => ghz.once("exit", r));

    await sleep(BEFORE_S * 1000);
    if (HOW === "kill") await kill(ferret);
    else ferret.kill("SIGSTOP");
    const killedAt = Date.now();
    progress(HOW === "kill" ? "FerretDB killed" : "FerretDB stopped");

    // Calls that need the store, every 200 ms while it is gone.
    const failTimes: { verify: number[]; write: number[]; early: string[]; codes: Set<string> } = { verify: [], write: [], early: [], codes: new Set() };
    let probing = true;
    const prober = (async () => {
      for (let i = 0; probing; i++) {
        for (const [kind, run] of [
          ["verify", () => unary(c.keys, "VerifyKey", { key: uncached }, rootKey)],
          ["write", () => unary(c.keys, "CreateKey", { api_id: "api_bench", name: `during ${i}` }, rootKey)],
        ] as const) {
          const t = Date.now();
          // Timed only once the store is known unreachable (health NOT_SERVING when the call starts).
          const known = health.seen.some(([at, s]) => at >= killedAt && s === "NOT_SERVING");
          try {
            await run();
            failTimes.codes.add(`${kind}:OK`);
          } catch (err) {
            failTimes.codes.add(`${kind}:${grpc.status[(err as grpc.ServiceError).code]}`);
            if (known) failTimes[kind].push(Date.now() - t);
            else failTimes.early.push(`${kind} sent ${t - killedAt} ms after the ${HOW}: ${Date.now() - t} ms`);
          }
        }
        await sleep(200);
      }
    })();

    await sleep(OUTAGE_S * 1000 - (Date.now() - killedAt));
    probing = false;
    await prober;
    const restartedAt = Date.now();
    if (HOW === "kill") ferret = await startFerretDb(dir, mongoPort);
    else {
      ferret.kill("SIGCONT");
      await answering(mongoPort);
    }
    const answeringAt = Date.now();
    progress(`FerretDB answering again after ${answeringAt - restartedAt} ms`);
    await ghzDone;
    health.stop();

    const report = JSON.parse(ghzOut) as { details?: { timestamp: string; latency: number; status: string; error: string }[] };
    const all = (report.details ?? []).map((d) => ({ at: Date.parse(d.timestamp), ms: d.latency / 1e6, status: d.status, error: d.error }));
    // ghz cancels the calls in flight when its time is up (answered Unavailable "use of closed network connection",
    // or Canceled, by ghz itself): not the server's answers.
    const endAt = Math.max(...all.map((d) => d.at + d.ms));
    const closedByGhz = /use of closed network connection|context canceled|transport is closing/;
    const cutOff = all.filter((d) => d.status !== "OK" && d.at + d.ms >= endAt - 1000 && (d.status === "Canceled" || closedByGhz.test(d.error)));
    const details = all.filter((d) => !cutOff.includes(d));
    if (process.env.BENCH_VERBOSE) {
      for (const d of all.filter((x) => x.status !== "OK")) progress(`error at +${d.at - ghzStarted} ms (${d.ms.toFixed(1)} ms): ${d.status} ${d.error}`);
      for (const d of all.filter((x) => x.ms > 250)) progress(`slow: started ${d.at - killedAt} ms after the ${HOW}, ${d.at - restartedAt} ms after the restart: ${d.ms.toFixed(1)} ms ${d.status}`);
    }
    const phase = (from: number, to: number) => {
      const inIt = details.filter((d) => d.at >= from && d.at < to);
      const lat = inIt.filter((d) => d.status === "OK").map((d) => d.ms).sort((a, b) => a - b);
      const errors: Record<string, number> = {};
      for (const d of inIt) if (d.status !== "OK") errors[d.status] = (errors[d.status] ?? 0) + 1;
      return { calls: inIt.length, errors, p50: pct(lat, 50), p99: pct(lat, 99), max: lat[lat.length - 1] ?? NaN };
    };
    const notServing = health.seen.find(([at, s]) => at >= killedAt && s === "NOT_SERVING")?.[0];
    const serving = health.seen.find(([at, s]) => at >= restartedAt && s === "SERVING")?.[0];
    const rows = [
      ["before the outage", phase(ghzStarted, killedAt)],
      [`during the outage (${OUTAGE_S} s)`, phase(killedAt, restartedAt)],
      ["during the outage, after its first 2 s", phase(killedAt + 2000, restartedAt)],
      ["after the restart", phase(restartedAt, Infinity)],
    ] as const;
    const sortedFail = (a: number[]) => [...a].sort((x, y) => x - y);
    const lines = [
      `FerretDB ${HOW === "kill" ? "killed (SIGKILL)" : "stopped (SIGSTOP)"} for ${OUTAGE_S} s under ${RPS} VerifyKey/s over ${loadKeys.length} cached keys (ghz, 10 workers)${REDIS ? ", Redis counters and credits" : ", credits in the store"}`,
      "",
      `(${cutOff.length} calls cut off by the end of the ghz run left out)`,
      "",
      "| cached verifications | calls | errors | p50 ms | p99 ms | max ms |",
      "|---|---|---|---|---|---|",
      ...rows.map(([name, r]) => `| ${name} | ${r.calls} | ${Object.entries(r.errors).map(([k, v]) => `${v} ${k}`).join(", ") || 0} | ${f(r.p50)} | ${f(r.p99)} | ${f(r.max)} |`),
      "",
      `- ${HOW} → NOT_SERVING: ${notServing ? notServing - killedAt : "never"} ms`,
      `- ${HOW === "kill" ? "restart (FerretDB spawned)" : "SIGCONT"} → SERVING: ${serving ? serving - restartedAt : "never"} ms (this script's own client, retrying every 50 ms, got FerretDB's first answer after ${answeringAt - restartedAt} ms)`,
      `- time to fail, once NOT_SERVING: uncached VerifyKey p50 ${f(pct(sortedFail(failTimes.verify), 50))} ms, max ${f(Math.max(...failTimes.verify))} ms (${failTimes.verify.length} calls); CreateKey p50 ${f(pct(sortedFail(failTimes.write), 50))} ms, max ${f(Math.max(...failTimes.write))} ms (${failTimes.write.length} calls); answers seen: ${[...failTimes.codes].join(", ")}`,
      `- calls that need the store, sent before NOT_SERVING: ${failTimes.early.join("; ") || "none"}`,
    ];
    process.stdout.write(lines.join("\n") + "\n");
    children.forEach((p) => p.kill("SIGKILL"));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`bench:outage failed: ${(err as Error).stack}\n`);
    process.exit(1);
  },
);
