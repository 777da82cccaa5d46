/**
 * HTTP/1.1 keep-alive connections stay usable. An answer given before its
 * request was read whole — a message over the limit, a refusal at the door —
 * used to leave the rest of the request unread on a connection that said
 * keep-alive: the client's next request on it waited behind the unread bytes
 * until the request timeout answered it 408 (the Connect conformance suite's
 * HTTP/1.1 cases failed that way, and stalled its runner). Such an answer now
 * says `Connection: close` and the connection is closed after it.
 *
 * Driven with raw sockets (every byte and the order of events under the test's
 * control) and with node:http's keep-alive Agent, a client that reuses
 * connections the way Go's and browsers' do.
 */
import http from "node:http";
import net from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { sleep, startFixture, type Fixture } from "./support.js";

const GET_KEY = "/latchkey.v1.KeyService/GetKey";
const WATCH = "/grpc.health.v1.Health/Watch";
const KIB = 1024;
// Short timeouts, so a connection left waiting shows as a 408 within the test.
const LIMITS = { maxMessageBytes: KIB, requestTimeoutMs: 1500, headersTimeoutMs: 500, idleTimeoutMs: 10_000 };

interface H1Response {
  status: number;
  headers: Record<string, string>;
  body: Buffer;
}

/** A raw HTTP/1.1 client connection: writes bytes, reads whole responses (Content-Length or chunked). */
async function rawConnection(port: number) {
  const socket = net.connect(port, "127.0.0.1");
  socket.on("error", () => undefined);
  await new Promise<void>((resolve) => socket.once("connect", () => resolve()));
  let buf = Buffer.alloc(0);
  let wake: (() => void) | null = null;
  socket.on("data", (d: Buffer) => {
    buf = Buffer.concat([buf, d]);
    wake?.();
  });
  const closed = new Promise<void>((resolve) => socket.once("close", () => resolve()));
  closed.then(() => wake?.());
  const more = () => new Promise<void>((resolve) => (wake = resolve));

  /** The next response, or null if the connection closed before a whole one arrived. */
  async function response(): Promise<H1Response | null> {
    for (;;) {
      const parsed = parse(buf);
      if (parsed) {
        buf = buf.subarray(parsed.used);
        return parsed.response;
      }
      if (socket.destroyed) return null;
      await more();
    }
  }
  return { socket, write: (b: string | Buffer) => socket.write(b), response, closed };
}

function parse(buf: Buffer): { response: H1Response; used: number } | null {
  const end = buf.indexOf("\r\n\r\n");
  if (end < 0) return null;
  const lines = buf.subarray(0, end).toString("latin1").split("\r\n");
  const status = Number(lines[0].split(" ")[1]);
  const headers: Record<string, string> = {};
  for (const l of lines.slice(1)) {
    const i = l.indexOf(":");
    headers[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim();
  }
  let at = end + 4;
  if (headers["transfer-encoding"] === "chunked") {
    const parts: Buffer[] = [];
    for (;;) {
      const eol = buf.indexOf("\r\n", at);
      if (eol < 0) return null;
      const size = parseInt(buf.subarray(at, eol).toString("latin1"), 16);
      if (size === 0) {
        const trailerEnd = buf.indexOf("\r\n\r\n", eol);
        if (trailerEnd < 0) return null;
        return { response: { status, headers, body: Buffer.concat(parts) }, used: trailerEnd + 4 };
      }
      if (buf.length < eol + 2 + size + 2) return null;
      parts.push(buf.subarray(eol + 2, eol + 2 + size));
      at = eol + 2 + size + 2;
    }
  }
  const length = Number(headers["content-length"] ?? 0);
  if (buf.length < at + length) return null;
  return { response: { status, headers, body: buf.subarray(at, at + length) }, used: at + length };
}

function head(path: string, headers: Record<string, string>): string {
  return `POST ${path} HTTP/1.1\r\nHost: latchkey\r\n${Object.entries(headers)
    .map(([k, v]) => `${k}: ${v}\r\n`)
    .join("")}\r\n`;
}

/** A 5-byte envelope prefix announcing `length` bytes. */
function prefix(length: number, flags = 0): Buffer {
  const p = Buffer.alloc(5);
  p[0] = flags;
  p.writeUInt32BE(length, 1);
  return p;
}

const SMALL_JSON = JSON.stringify({ id: "x" });
/** A Connect call any keep-alive connection must still answer. */
const goodCall = head(GET_KEY, { authorization: "Bearer good", "content-type": "application/json", "content-length": String(SMALL_JSON.length) }) + SMALL_JSON;

interface EarlyCase {
  name: string;
  /** Everything the client sends (or starts to send) before it reads the answer. */
  request: Buffer;
  check(r: H1Response): void;
}

const big = 100 * KIB;
const bigJson = JSON.stringify({ id: "x".repeat(big) });
const cases: EarlyCase[] = [
  {
    name: "gRPC-Web, a message over the limit (Content-Length)",
    request: Buffer.concat([
      Buffer.from(head(GET_KEY, { authorization: "Bearer good", "content-type": "application/grpc-web+proto", "content-length": String(5 + big) })),
      prefix(big),
      Buffer.alloc(big),
    ]),
    check: (r) => {
      expect(r.status).toBe(200);
      expect(r.body.toString("latin1")).toMatch(/grpc-status: ?8/);
    },
  },
  {
    name: "Connect unary JSON over the limit (Content-Length)",
    request: Buffer.from(head(GET_KEY, { authorization: "Bearer good", "content-type": "application/json", "content-length": String(bigJson.length) }) + bigJson),
    check: (r) => {
      expect(r.status).toBe(429);
      expect(JSON.parse(r.body.toString())).toMatchObject({ code: "resource_exhausted" });
    },
  },
  {
    name: "Connect streaming, a health Watch message over the limit (chunked, never finished)",
    request: Buffer.concat([
      Buffer.from(head(WATCH, { "content-type": "application/connect+proto", "transfer-encoding": "chunked" })),
      Buffer.from(`${(5 + 32 * KIB).toString(16)}\r\n`),
      prefix(big),
      Buffer.alloc(32 * KIB),
      Buffer.from("\r\n"),
    ]),
    check: (r) => {
      expect(r.status).toBe(200);
      expect(r.body.toString("latin1")).toMatch(/resource_exhausted/);
    },
  },
  {
    name: "gRPC-Web without a root key (refused at the door, body not read)",
    request: Buffer.concat([
      Buffer.from(head(GET_KEY, { "content-type": "application/grpc-web+proto", "content-length": String(5 + big) })),
      prefix(big),
      Buffer.alloc(16 * KIB),
    ]),
    check: (r) => {
      expect(r.status).toBe(200);
      expect(r.headers["grpc-status"]).toBe("16");
    },
  },
];

describe("an HTTP/1.1 answer given before the request was read whole", () => {
  let fx: Fixture;
  beforeAll(async () => {
    fx = await startFixture(LIMITS);
  });

  for (const c of cases) {
    it(`${c.name}: says Connection: close and the server closes the connection, so no next request waits behind the unread body`, async () => {
      const conn = await rawConnection(fx.port);
      conn.write(c.request);
      const r = await conn.response();
      expect(r, "no answer").not.toBeNull();
      c.check(r!);
      expect(r!.headers.connection).toBe("close");
      await conn.closed;
      // A new connection is served at once.
      const next = await rawConnection(fx.port);
      next.write(goodCall);
      expect((await next.response())?.status).toBe(200);
      next.socket.destroy();
    });
  }

  it("a request the client sends on that connection anyway is not left waiting for a 408: the connection closes", async () => {
    // A client that ignores `Connection: close`, or wrote before it arrived.
    const conn = await rawConnection(fx.port);
    conn.write(cases[0].request);
    const r = await conn.response();
    expect(r).not.toBeNull();
    conn.write(goodCall);
    const next = await conn.response();
    expect(next, "an answer (408 after the request timeout) instead of a closed connection").toBeNull();
    await conn.closed;
  });

  afterAll(async () => {
    await fx.assertAlive();
  });
});

interface AgentResult {
  status: number;
  body: string;
  socket: net.Socket;
}

function agentCall(port: number, agent: http.Agent, path: string, headers: Record<string, string>, body: Buffer | string): Promise<AgentResult> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: "127.0.0.1", port, method: "POST", path, headers, agent }, (res) => {
      let text = "";
      res.setEncoding("latin1");
      res.on("data", (d: string) => (text += d));
      res.on("end", () => resolve({ status: res.statusCode!, body: text, socket: req.socket! }));
    });
    req.on("error", reject);
    req.end(body);
  });
}

describe("a keep-alive HTTP/1.1 client (node:http Agent) making calls one after another for longer than the request timeout", () => {
  let fx: Fixture;
  beforeAll(async () => {
    fx = await startFixture(LIMITS);
  });

  it("keeps one connection for all of them, and every one is answered", async () => {
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    const sockets = new Set<net.Socket>();
    const until = Date.now() + 2 * LIMITS.requestTimeoutMs;
    let n = 0;
    while (Date.now() < until) {
      const r = await agentCall(fx.port, agent, GET_KEY, { authorization: "Bearer good", "content-type": "application/json" }, SMALL_JSON);
      expect(r.status, `call ${n}`).toBe(200);
      sockets.add(r.socket);
      n++;
      await sleep(50); // pacing: the calls span more than the request timeout
    }
    expect(sockets.size).toBe(1);
    agent.destroy();
  });

  it("with answers given before the request was read among them: every call is answered, none 408", async () => {
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    const oversized = JSON.stringify({ id: "x".repeat(200 * KIB) });
    const grpcWebOversized = Buffer.concat([prefix(200 * KIB), Buffer.alloc(200 * KIB)]);
    const calls: [string, () => Promise<AgentResult>, (r: AgentResult) => void][] = [
      ["Connect JSON", () => agentCall(fx.port, agent, GET_KEY, { authorization: "Bearer good", "content-type": "application/json" }, SMALL_JSON), (r) => expect(r.status).toBe(200)],
      [
        "Connect JSON over the limit",
        () => agentCall(fx.port, agent, GET_KEY, { authorization: "Bearer good", "content-type": "application/json" }, oversized),
        (r) => expect(r.status).toBe(429),
      ],
      ["Connect JSON after it", () => agentCall(fx.port, agent, GET_KEY, { authorization: "Bearer good", "content-type": "application/json" }, SMALL_JSON), (r) => expect(r.status).toBe(200)],
      [
        "gRPC-Web over the limit",
        () => agentCall(fx.port, agent, GET_KEY, { authorization: "Bearer good", "content-type": "application/grpc-web+proto" }, grpcWebOversized),
        (r) => {
          expect(r.status).toBe(200);
          expect(r.body).toMatch(/grpc-status: ?8/);
        },
      ],
    ];
    const until = Date.now() + 2 * LIMITS.requestTimeoutMs;
    let round = 0;
    while (Date.now() < until) {
      for (const [what, call, check] of calls) {
        const r = await call();
        expect(r.status, `round ${round}, ${what}: ${r.body}`).not.toBe(408);
        check(r);
      }
      round++;
      await sleep(50);
    }
    agent.destroy();
  });

  afterAll(async () => {
    await fx.assertAlive();
  });
});
