/**
 * Wire-level helpers for the transport tests: a gated server process
 * (fixtures/gated-server.ts), raw node:http2 gRPC calls, health checks, and a
 * few hand-written HTTP/2 frames for what node:http2 clients refuse to send.
 */
import { create, toBinary, type DescMessage, type MessageInitShape } from "@bufbuild/protobuf";
import { spawn, type ChildProcess } from "node:child_process";
import http2 from "node:http2";
import net from "node:net";
import path from "node:path";
import { createInterface } from "node:readline";
import { afterAll, expect } from "vitest";
import { REPO, sleep } from "../integration/support.js";
import type { TransportLimits } from "../../src/server/http-server.js";

export { sleep };

// ---------------------------------------------------------------------------
// gRPC framing.

/** A gRPC / Connect-streaming envelope: flags, big-endian length, payload. */
export function envelope(payload: Uint8Array, flags = 0): Buffer {
  const out = Buffer.alloc(5 + payload.length);
  out[0] = flags;
  out.writeUInt32BE(payload.length, 1);
  out.set(payload, 5);
  return out;
}

export function message<T extends DescMessage>(schema: T, init: MessageInitShape<T>): Buffer {
  return envelope(toBinary(schema, create(schema, init)));
}

export interface GrpcOutcome {
  /** grpc-status from trailers (or headers, trailers-only); undefined when the stream was reset without one. */
  status: string | undefined;
  message: string;
  headers: http2.IncomingHttpHeaders;
  trailers: http2.IncomingHttpHeaders;
  data: Buffer;
  rstCode: number | undefined;
}

/** Collects what a client stream receives until it closes. */
export function outcome(s: http2.ClientHttp2Stream): Promise<GrpcOutcome> {
  return new Promise((resolve) => {
    const o: GrpcOutcome = { status: undefined, message: "", headers: {}, trailers: {}, data: Buffer.alloc(0), rstCode: undefined };
    const chunks: Buffer[] = [];
    s.on("error", () => undefined);
    s.on("response", (h) => {
      o.headers = h;
      if (h["grpc-status"] !== undefined) {
        o.status = String(h["grpc-status"]);
        o.message = decodeURIComponent(String(h["grpc-message"] ?? ""));
      }
    });
    s.on("trailers", (t) => {
      o.trailers = t;
      o.status = String(t["grpc-status"]);
      o.message = decodeURIComponent(String(t["grpc-message"] ?? ""));
    });
    s.on("data", (d: Buffer) => chunks.push(d));
    s.on("close", () => {
      o.data = Buffer.concat(chunks);
      o.rstCode = s.rstCode;
      resolve(o);
    });
  });
}

export function connect(port: number, settings: http2.Settings = {}): http2.ClientHttp2Session {
  const c = http2.connect(`http://127.0.0.1:${port}`, { settings });
  c.on("error", () => undefined);
  return c;
}

export const GRPC = { ":method": "POST", "content-type": "application/grpc", te: "trailers" } as const;

/** Opens a gRPC request stream on `session` (body not sent). */
export function grpcStream(session: http2.ClientHttp2Session, path: string, headers: http2.OutgoingHttpHeaders = {}): http2.ClientHttp2Stream {
  const s = session.request({ ...GRPC, ":path": path, ...headers });
  s.on("error", () => undefined);
  return s;
}

/** One unary gRPC call on a connection of its own. */
export async function grpcCall(port: number, path: string, body: Buffer, headers: http2.OutgoingHttpHeaders = {}): Promise<GrpcOutcome> {
  const c = connect(port);
  try {
    const s = grpcStream(c, path, headers);
    const o = outcome(s);
    // A connection that fails (nothing listening) ends the call without an answer.
    c.once("close", () => s.destroy());
    s.end(body);
    return await o;
  } finally {
    c.close();
  }
}

const EMPTY = envelope(new Uint8Array(0));

/** A health Check on a new connection: resolves with its grpc-status ("0" when served). */
export async function healthStatus(port: number): Promise<string | undefined> {
  return (await grpcCall(port, "/grpc.health.v1.Health/Check", EMPTY)).status;
}

/** Waits for `fn` to hold, polling; fails after `ms`. */
export async function eventually(fn: () => boolean | Promise<boolean>, what: string, ms = 10_000): Promise<void> {
  const until = Date.now() + ms;
  while (!(await fn())) {
    if (Date.now() > until) throw new Error(`not within ${ms} ms: ${what}`);
    await sleep(20);
  }
}

// ---------------------------------------------------------------------------
// The gated server process.

export interface FixtureEvent {
  event: string;
  id?: string;
  code?: string;
  timeoutMs?: number | null;
  aborted?: boolean;
  port?: number;
}

export interface Fixture {
  port: number;
  proc: ChildProcess;
  events: FixtureEvent[];
  /** Resolves with the first event (seen or to come) matching. */
  waitFor(pred: (e: FixtureEvent) => boolean, what: string, ms?: number): Promise<FixtureEvent>;
  release(id: string): void;
  /** The process is running and answers a health Check on a new connection. */
  assertAlive(): Promise<void>;
  stop(): Promise<void>;
  stderr(): string;
}

/** Node runs the fixture's TypeScript itself (test/support/ts-hooks.mjs maps its `.js` imports to `.ts`). */
const TS_ARGS = ["--experimental-transform-types", "--no-warnings=ExperimentalWarning", "--import", path.join(REPO, "test/support/ts-register.mjs")];
const FIXTURE = path.join(REPO, "test/transport/fixtures/gated-server.ts");
const fixtures = new Set<Fixture>();
afterAll(async () => {
  for (const f of fixtures) await f.stop();
});

/** Starts fixtures/gated-server.ts with these transport limits. */
export async function startFixture(limits: Partial<TransportLimits> = {}): Promise<Fixture> {
  const proc = spawn(process.execPath, [...TS_ARGS, FIXTURE], {
    cwd: REPO,
    env: { ...process.env, FIXTURE_LIMITS: JSON.stringify(limits) },
    stdio: ["pipe", "pipe", "pipe"],
  });
  let err = "";
  proc.stderr!.setEncoding("utf8").on("data", (d: string) => (err += d));
  const events: FixtureEvent[] = [];
  const waiters = new Set<{ pred: (e: FixtureEvent) => boolean; resolve: (e: FixtureEvent) => void }>();
  createInterface({ input: proc.stdout! }).on("line", (line) => {
    let e: FixtureEvent;
    try {
      e = JSON.parse(line) as FixtureEvent;
    } catch {
      return;
    }
    events.push(e);
    for (const w of waiters) {
      if (w.pred(e)) {
        waiters.delete(w);
        w.resolve(e);
      }
    }
  });
  const exited = new Promise<void>((resolve) => proc.once("exit", () => resolve()));
  const waitFor = (pred: (e: FixtureEvent) => boolean, what: string, ms = 10_000) => {
    const seen = events.find(pred);
    if (seen) return Promise.resolve(seen);
    return new Promise<FixtureEvent>((resolve, reject) => {
      const w = { pred, resolve };
      waiters.add(w);
      setTimeout(() => {
        if (!waiters.delete(w)) return;
        reject(new Error(`fixture: no ${what} within ${ms} ms; events: ${JSON.stringify(events)}\nstderr: ${err}`));
      }, ms).unref();
    });
  };
  const listening = await Promise.race([
    waitFor((e) => e.event === "listening", "listening", 30_000),
    exited.then(() => {
      throw new Error(`fixture exited before listening:\n${err}`);
    }),
  ]);
  const f: Fixture = {
    port: listening.port!,
    proc,
    events,
    waitFor,
    release: (id) => proc.stdin!.write(JSON.stringify({ release: id }) + "\n"),
    async assertAlive() {
      expect(proc.exitCode, `fixture exited; stderr:\n${err}`).toBeNull();
      expect(proc.signalCode).toBeNull();
      expect(await healthStatus(f.port)).toBe("0");
    },
    async stop() {
      fixtures.delete(f);
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
      await exited;
    },
    stderr: () => err,
  };
  fixtures.add(f);
  return f;
}

// ---------------------------------------------------------------------------
// Raw HTTP/2 frames, for clients that break the rules node:http2 enforces.

export const FRAME = { DATA: 0, HEADERS: 1, RST_STREAM: 3, SETTINGS: 4, PING: 6, GOAWAY: 7, WINDOW_UPDATE: 8 } as const;
export const FLAG = { END_STREAM: 1, ACK: 1, END_HEADERS: 4 } as const;

export function frame(type: number, flags: number, streamId: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(9);
  h.writeUIntBE(payload.length, 0, 3);
  h[3] = type;
  h[4] = flags;
  h.writeUInt32BE(streamId, 5);
  return Buffer.concat([h, payload]);
}

/** HPACK: every field as a literal without indexing, no Huffman coding. */
export function hpack(fields: [string, string][]): Buffer {
  const parts: Buffer[] = [];
  const len = (n: number) => {
    if (n < 127) return Buffer.from([n]);
    const out = [127];
    n -= 127;
    while (n >= 128) {
      out.push((n & 127) | 128);
      n >>= 7;
    }
    out.push(n);
    return Buffer.from(out);
  };
  for (const [k, v] of fields) parts.push(Buffer.from([0]), len(k.length), Buffer.from(k), len(v.length), Buffer.from(v));
  return Buffer.concat(parts);
}

export const PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");

export interface ParsedFrame {
  type: number;
  flags: number;
  streamId: number;
  payload: Buffer;
}

/** A raw HTTP/2 client connection: writes frames, collects the frames it receives. */
export async function rawH2(port: number): Promise<{ socket: net.Socket; frames: ParsedFrame[]; send(b: Buffer): void; closed: Promise<void> }> {
  const socket = net.connect(port, "127.0.0.1");
  socket.on("error", () => undefined);
  await new Promise<void>((r) => socket.once("connect", () => r()));
  const frames: ParsedFrame[] = [];
  let buf = Buffer.alloc(0);
  socket.on("data", (d: Buffer) => {
    buf = Buffer.concat([buf, d]);
    while (buf.length >= 9) {
      const n = buf.readUIntBE(0, 3);
      if (buf.length < 9 + n) break;
      frames.push({ type: buf[3], flags: buf[4], streamId: buf.readUInt32BE(5) & 0x7fffffff, payload: buf.subarray(9, 9 + n) });
      buf = buf.subarray(9 + n);
    }
  });
  const closed = new Promise<void>((r) => socket.once("close", () => r()));
  return { socket, frames, send: (b) => socket.write(b), closed };
}
