import { spawn, type ChildProcess } from "node:child_process";
import { createWriteStream, existsSync, mkdtempSync, readFileSync, renameSync, rmSync } from "node:fs";
import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { performance } from "node:perf_hooks";
import { createGzip, gzipSync } from "node:zlib";

/*
 * npm run bench:attacks (node dist/bench/attacks.js) — replays the front-door attacks of issue 8 against
 * a started server, one fresh server per attack, while sampling the server's
 * RSS and the latency of a health Check on a connection of its own. Not a test:
 * it reports figures. Settings (defaults in brackets):
 *   ATTACK_SERVER_ROOT [this checkout]  checkout whose dist/src/cli.js is started
 *                                       (e.g. a build of main, for the "before" figures)
 *   ATTACK_ONLY [all]                   comma-separated attack names
 *   ATTACK_BOMB_MIB [1024]              size the gzip bombs inflate to
 *   ATTACK_SECONDS [15]                 how long the slow and flooding attacks run
 *   ATTACK_ENV                          extra server environment, JSON
 */

const ROOT = process.env.ATTACK_SERVER_ROOT ?? new URL("../..", import.meta.url).pathname;
const ONLY = process.env.ATTACK_ONLY ? new Set(process.env.ATTACK_ONLY.split(",")) : null;
const BOMB_MIB = Number(process.env.ATTACK_BOMB_MIB ?? 1024);
const SECONDS = Number(process.env.ATTACK_SECONDS ?? 15);
const EXTRA_ENV = JSON.parse(process.env.ATTACK_ENV ?? "{}") as Record<string, string>;
const progress = (msg: string) => process.stderr.write(`attacks: ${msg}\n`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Server {
  proc: ChildProcess;
  port: number;
  rootKey: string;
  exited: boolean;
  log: () => string;
}

async function startServer(): Promise<Server> {
  const dataDir = mkdtempSync(join(tmpdir(), "latchkey-attacks-"));
  const proc = spawn(process.execPath, [join(ROOT, "dist/src/cli.js"), "serve"], {
    env: { ...process.env, LATCHKEY_PORT: "0", LATCHKEY_METRICS_PORT: "0", LATCHKEY_DATA_DIR: dataDir, LATCHKEY_LOG_LEVEL: "info", ...EXTRA_ENV },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  proc.stderr!.on("data", (d: Buffer) => (out += d.toString()));
  const server: Server = { proc, port: 0, rootKey: "", exited: false, log: () => out };
  proc.once("exit", () => {
    server.exited = true;
    rmSync(dataDir, { recursive: true, force: true });
  });
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server did not start:\n${out}`)), 30_000);
    createInterface({ input: proc.stdout! }).on("line", (line) => {
      out += line + "\n";
      const key = /\blkroot_[1-9A-HJ-NP-Za-km-z]+/.exec(line);
      if (key) server.rootKey = key[0];
      try {
        const j = JSON.parse(line) as { port?: number };
        if (typeof j.port === "number") {
          server.port = j.port;
          clearTimeout(timer);
          resolve();
        }
      } catch {
        // the bootstrap banner
      }
    });
  });
  // The bootstrap root key is handed over in a file readable by its owner only
  // (never on stdout among the log lines): read it from there.
  const keyFile = join(dataDir, "bootstrap-root-key");
  if (!server.rootKey && existsSync(keyFile)) server.rootKey = readFileSync(keyFile, "utf8").trim();
  if (!server.rootKey) throw new Error(`no bootstrap root key in ${keyFile} or on stdout:\n${out}`);
  return server;
}

function rssMiB(pid: number): number {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) / 1024 : NaN;
  } catch {
    return NaN;
  }
}

const EMPTY_MESSAGE = Buffer.from([0, 0, 0, 0, 0]);

/** One gRPC health Check on its own connection; resolves with ms, or rejects. */
function healthCheck(port: number, timeoutMs = 10_000): Promise<number> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const c = http2.connect(`http://127.0.0.1:${port}`);
    const timer = setTimeout(() => {
      c.destroy();
      reject(new Error("timeout"));
    }, timeoutMs);
    c.on("error", (e) => {
      clearTimeout(timer);
      reject(e);
    });
    const s = c.request({ ":method": "POST", ":path": "/grpc.health.v1.Health/Check", "content-type": "application/grpc", te: "trailers" });
    s.on("error", () => undefined);
    let status: string | undefined;
    s.on("response", (h) => (status = (h["grpc-status"] as string) ?? status));
    s.on("trailers", (t) => (status = t["grpc-status"] as string));
    s.on("data", () => undefined);
    s.on("close", () => {
      clearTimeout(timer);
      c.close();
      if (status === "0") resolve(performance.now() - t0);
      else reject(new Error(`grpc-status ${status}`));
    });
    s.end(EMPTY_MESSAGE);
  });
}

interface Sample {
  rssBefore: number;
  rssPeak: number;
  rssAfter: number;
  healthMaxMs: number;
  healthFailures: number;
  alive: boolean;
}

/** Samples RSS every 100 ms and a health Check every 250 ms while `attack` runs, then 3 s more. */
async function measure(server: Server, attack: () => Promise<string>): Promise<Sample & { outcome: string }> {
  const pid = server.proc.pid!;
  const rssBefore = rssMiB(pid);
  let rssPeak = rssBefore;
  let healthMaxMs = 0;
  let healthFailures = 0;
  const healthErrors = new Set<string>();
  let running = true;
  const rssTimer = setInterval(() => {
    const r = rssMiB(pid);
    if (r > rssPeak) rssPeak = r;
  }, 100);
  const prober = (async () => {
    while (running) {
      try {
        healthMaxMs = Math.max(healthMaxMs, await healthCheck(server.port));
      } catch (err) {
        healthFailures++;
        healthErrors.add((err as Error).message);
      }
      await sleep(250);
    }
  })();
  let outcome: string;
  try {
    outcome = await attack();
  } catch (err) {
    outcome = `attack failed: ${(err as Error).message}`;
  }
  await sleep(3000);
  running = false;
  await prober;
  clearInterval(rssTimer);
  const rssAfter = rssMiB(pid);
  if (healthErrors.size > 0) progress(`health Check failures: ${[...healthErrors].join("; ")}`);
  return { rssBefore, rssPeak: Math.max(rssPeak, Number.isNaN(rssAfter) ? 0 : rssAfter), rssAfter, healthMaxMs, healthFailures, alive: !server.exited, outcome };
}

// ---------------------------------------------------------------------------
// The attacks.

function connectH2(port: number): http2.ClientHttp2Session {
  const c = http2.connect(`http://127.0.0.1:${port}`, { settings: { initialWindowSize: 1 << 20 } });
  c.on("error", () => undefined);
  return c;
}

/** Issue 8, 1: two streams announcing 1000 bytes and sending 100, then the session is destroyed; five times. */
async function crash(server: Server): Promise<string> {
  for (const auth of [null, server.rootKey]) {
    for (let i = 0; i < 5; i++) {
      const c = connectH2(server.port);
      for (let j = 0; j < 2; j++) {
        const h: http2.OutgoingHttpHeaders = { ":method": "POST", ":path": "/latchkey.v1.KeyService/VerifyKey", "content-type": "application/grpc", te: "trailers" };
        if (auth) h.authorization = `Bearer ${auth}`;
        const s = c.request(h);
        s.on("error", () => undefined);
        const head = Buffer.alloc(5);
        head.writeUInt32BE(1000, 1);
        s.write(Buffer.concat([head, Buffer.alloc(100)]));
      }
      await sleep(300);
      c.destroy();
      await sleep(200);
    }
  }
  return server.exited ? "server died" : "server alive after 10 tries";
}

/** A gzip stream of BOMB_MIB MiB of zeros (about 1 MB for 1 GiB), made once and kept in the temp dir. */
async function bomb(): Promise<Buffer> {
  const file = join(tmpdir(), `latchkey-bomb-${BOMB_MIB}.gz`);
  if (!existsSync(file)) {
    progress(`making a gzip bomb of ${BOMB_MIB} MiB`);
    const gz = createGzip({ level: 9 });
    const done = new Promise<void>((resolve, reject) => gz.pipe(createWriteStream(file + ".tmp")).on("finish", resolve).on("error", reject));
    const mib = Buffer.alloc(1 << 20);
    for (let i = 0; i < BOMB_MIB; i++) if (!gz.write(mib)) await new Promise((r) => gz.once("drain", r));
    gz.end();
    await done;
    renameSync(file + ".tmp", file);
  }
  return readFileSync(file);
}

/** Sends one HTTP/1.1 request; resolves with the status and how many body bytes were written before the response came. */
/** Writes a chunk; resolves false once the response came (stop writing). */
type Writer = (b: Buffer) => Promise<boolean>;

function h1Request(port: number, headers: Record<string, string>, body: Buffer | ((write: Writer) => Promise<void>), timeoutMs = 60_000): Promise<string> {
  return new Promise((resolve) => {
    let written = 0;
    let answered = false;
    const t0 = performance.now();
    const req = http.request({ host: "127.0.0.1", port, method: "POST", path: "/latchkey.v1.KeyService/VerifyKey", headers });
    const timer = setTimeout(() => {
      req.destroy();
      resolve(`no answer in ${timeoutMs} ms (${(written / 2 ** 20).toFixed(0)} MiB sent)`);
    }, timeoutMs);
    req.on("response", (res) => {
      answered = true;
      // Bytes on the wire, not what waits in the client's buffer.
      const sent = req.socket?.bytesWritten ?? written;
      let text = "";
      res.on("data", (d: Buffer) => (text += d.toString().slice(0, 200)));
      res.on("end", () => {
        clearTimeout(timer);
        resolve(`HTTP ${res.statusCode} ${text.slice(0, 90)} after ${((performance.now() - t0) / 1000).toFixed(1)} s, ${(sent / 2 ** 20).toFixed(1)} MiB of the body sent`);
        req.destroy();
      });
    });
    req.on("error", (e) => {
      clearTimeout(timer);
      resolve(`error ${e.message} after ${(written / 2 ** 20).toFixed(1)} MiB sent`);
    });
    if (Buffer.isBuffer(body)) {
      written = body.length;
      req.end(body);
    } else {
      void body(async (b) => {
        if (answered) return false;
        written += b.length;
        if (!req.write(b)) await new Promise((r) => req.once("drain", r));
        return !answered;
      }).then(() => req.end());
    }
  });
}

async function gzipConnect(server: Server, contentType: string): Promise<string> {
  const b = await bomb();
  return h1Request(server.port, { "content-type": contentType, "content-encoding": "gzip", "content-length": String(b.length) }, b);
}

async function gzipGrpc(server: Server): Promise<string> {
  const b = await bomb();
  const c = connectH2(server.port);
  const head = Buffer.alloc(5);
  head[0] = 1;
  head.writeUInt32BE(b.length, 1);
  const t0 = performance.now();
  const s = c.request({ ":method": "POST", ":path": "/latchkey.v1.KeyService/VerifyKey", "content-type": "application/grpc", "grpc-encoding": "gzip", te: "trailers" });
  const r = await grpcOutcome(s, Buffer.concat([head, b]), 60_000);
  c.destroy();
  return `${r} after ${((performance.now() - t0) / 1000).toFixed(1)} s`;
}

function grpcOutcome(s: http2.ClientHttp2Stream, body: Buffer | null, timeoutMs: number): Promise<string> {
  return new Promise((resolve) => {
    let status: string | undefined;
    let message = "";
    const timer = setTimeout(() => {
      s.close();
      resolve("no answer");
    }, timeoutMs);
    s.on("error", () => undefined);
    s.on("response", (h) => {
      if (h["grpc-status"]) status = h["grpc-status"] as string;
      message = decodeURIComponent((h["grpc-message"] as string) ?? "");
    });
    s.on("trailers", (t) => {
      status = t["grpc-status"] as string;
      message = decodeURIComponent((t["grpc-message"] as string) ?? "");
    });
    s.on("data", () => undefined);
    s.on("close", () => {
      clearTimeout(timer);
      resolve(status === undefined ? `stream closed (rst ${s.rstCode})` : `grpc-status ${status} ${message.slice(0, 80)}`);
    });
    if (body) s.end(body);
  });
}

async function h1Large(server: Server): Promise<string> {
  const mib = Buffer.alloc(1 << 20, 0x61);
  return h1Request(server.port, { "content-type": "application/json", "content-length": String(200 * 2 ** 20) }, async (write) => {
    for (let i = 0; i < 200; i++) if (!(await write(mib))) return;
  });
}

/** One connection, 2,000 gRPC streams each announcing 4 MiB and sending 64 KiB every 500 ms. */
async function slowStreams(server: Server, auth: boolean): Promise<string> {
  const c = connectH2(server.port);
  await new Promise((r) => c.once("remoteSettings", r));
  const advertised = c.remoteSettings.maxConcurrentStreams;
  const streams: http2.ClientHttp2Stream[] = [];
  let refused = 0;
  let answered = 0;
  const chunk = Buffer.alloc(64 * 1024);
  for (let i = 0; i < 2000; i++) {
    const h: http2.OutgoingHttpHeaders = { ":method": "POST", ":path": "/latchkey.v1.KeyService/VerifyKey", "content-type": "application/grpc", te: "trailers" };
    if (auth) h.authorization = `Bearer ${server.rootKey}`;
    const s = c.request(h);
    s.on("error", () => undefined);
    s.on("response", () => answered++);
    s.on("close", () => {
      if (s.rstCode === http2.constants.NGHTTP2_REFUSED_STREAM) refused++;
    });
    const head = Buffer.alloc(5);
    head.writeUInt32BE(4 * 2 ** 20, 1);
    s.write(head);
    streams.push(s);
  }
  const until = Date.now() + SECONDS * 1000;
  while (Date.now() < until && !c.destroyed) {
    for (const s of streams) if (!s.closed && !s.destroyed) s.write(chunk);
    await sleep(500);
  }
  const open = streams.filter((s) => !s.closed).length;
  c.destroy();
  return `server advertises maxConcurrentStreams ${advertised}; after ${SECONDS} s: ${answered} answered, ${refused} refused, ${open} still open`;
}

/** 5,000 health Watch streams without authorization, on 50 connections. */
async function watchFlood(server: Server): Promise<string> {
  const sessions: http2.ClientHttp2Session[] = [];
  let serving = 0;
  const statuses = new Map<string, number>();
  for (let i = 0; i < 50; i++) {
    const c = connectH2(server.port);
    sessions.push(c);
    for (let j = 0; j < 100; j++) {
      const s = c.request({ ":method": "POST", ":path": "/grpc.health.v1.Health/Watch", "content-type": "application/grpc", te: "trailers" });
      s.on("error", () => undefined);
      s.once("data", () => serving++);
      s.on("trailers", (t) => statuses.set(t["grpc-status"] as string, (statuses.get(t["grpc-status"] as string) ?? 0) + 1));
      s.on("response", (h) => {
        if (h["grpc-status"]) statuses.set(h["grpc-status"] as string, (statuses.get(h["grpc-status"] as string) ?? 0) + 1);
      });
      s.end(EMPTY_MESSAGE);
    }
  }
  await sleep(SECONDS * 1000);
  for (const c of sessions) c.destroy();
  return `${serving} watches got a status; ended early with grpc-status: ${JSON.stringify(Object.fromEntries(statuses))}`;
}

/** 1,000 raw TCP connections, 500 with half-sent HTTP/1.1 headers, 200 with the HTTP/2 preface only; how many the server closed. */
async function silentSockets(server: Server): Promise<string> {
  const groups: Record<string, { sockets: net.Socket[]; closed: number }> = {};
  const open = (name: string, n: number, first: Buffer | null) => {
    const g = (groups[name] = { sockets: [] as net.Socket[], closed: 0 });
    for (let i = 0; i < n; i++) {
      const s = net.connect(server.port, "127.0.0.1");
      s.on("error", () => undefined);
      s.on("data", () => undefined);
      s.on("close", () => g.closed++);
      if (first) s.on("connect", () => s.write(first));
      g.sockets.push(s);
    }
  };
  open("raw", 1000, null);
  await sleep(500);
  open("half-sent HTTP/1.1 headers", 500, Buffer.from("POST /latchkey.v1.KeyService/VerifyKey HTTP/1.1\r\nHost: x\r\n"));
  await sleep(500);
  open("HTTP/2 preface only", 200, Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
  const report = (at: number) =>
    `at ${at} s closed by the server: ` +
    Object.entries(groups)
      .map(([k, g]) => `${k} ${g.closed}/${g.sockets.length}`)
      .join(", ");
  const lines: string[] = [];
  const wait = Math.max(SECONDS, 25);
  await sleep(wait * 1000);
  lines.push(report(wait));
  for (const g of Object.values(groups)) for (const s of g.sockets) s.destroy();
  return lines.join("; ");
}

async function connectLarge(server: Server, gzipped: boolean): Promise<string> {
  const json = Buffer.from(JSON.stringify({ key: "sk_" + "a".repeat(8 * 2 ** 20) }));
  const body = gzipped ? gzipSync(json) : json;
  const headers: Record<string, string> = { "content-type": "application/json", authorization: `Bearer ${server.rootKey}`, "content-length": String(body.length) };
  if (gzipped) headers["content-encoding"] = "gzip";
  return h1Request(server.port, headers, body);
}

const ATTACKS: Record<string, (s: Server) => Promise<string>> = {
  crash,
  "gzip-bomb-connect-json": (s) => gzipConnect(s, "application/json"),
  "gzip-bomb-connect-proto": (s) => gzipConnect(s, "application/proto"),
  "gzip-bomb-grpc": gzipGrpc,
  "h1-200mib-unauthenticated": h1Large,
  "h2-2000-slow-streams": (s) => slowStreams(s, false),
  "h2-2000-slow-streams-with-root-key": (s) => slowStreams(s, true),
  "watch-flood-5000": watchFlood,
  "silent-sockets": silentSockets,
  "connect-json-8mib-with-root-key": (s) => connectLarge(s, false),
  "connect-json-8mib-gzipped-with-root-key": (s) => connectLarge(s, true),
};

async function main() {
  progress(`server: ${ROOT}`);
  const rows: string[] = [
    "| attack | outcome | RSS before / peak / after (MiB) | health Check max ms | failed Checks | server alive |",
    "|---|---|---|---|---|---|",
  ];
  for (const [name, attack] of Object.entries(ATTACKS)) {
    if (ONLY && !ONLY.has(name)) continue;
    progress(name);
    const server = await startServer();
    await sleep(500);
    const r = await measure(server, () => attack(server));
    rows.push(
      `| ${name} | ${r.outcome.replace(/\|/g, "/").replace(/\n/g, " ")} | ${r.rssBefore.toFixed(0)} / ${r.rssPeak.toFixed(0)} / ${r.rssAfter.toFixed(0)} | ${r.healthMaxMs.toFixed(1)} | ${r.healthFailures} | ${r.alive ? "yes" : "NO"} |`,
    );
    progress(rows[rows.length - 1]);
    if (!server.exited) {
      server.proc.kill("SIGKILL");
      await new Promise((r2) => server.proc.once("exit", r2));
    }
  }
  process.stdout.write(rows.join("\n") + "\n");
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`attacks failed: ${(err as Error).stack}\n`);
    process.exit(1);
  },
);
