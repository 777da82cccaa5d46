/**
 * The front door at the wire (issue 8, item 2): before its root key is checked
 * a request costs a small, fixed amount — on every protocol of the one port —
 * and every socket, stream and message is bounded by a setting. Each test
 * drives the real server process with node:http2 / node:http clients or raw
 * frames.
 */
import http from "node:http";
import http2 from "node:http2";
import { execFileSync } from "node:child_process";
import net from "node:net";
import path from "node:path";
import tls from "node:tls";
import { gzipSync } from "node:zlib";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CreateKeyRequestSchema, ListKeysRequestSchema, VerifyKeyRequestSchema } from "../../gen/latchkey/v1/key_service_pb.js";
import { startServer, tempDir, type ServerProcess } from "../integration/support.js";
import {
  FLAG,
  FRAME,
  PREFACE,
  connect,
  envelope,
  eventually,
  frame,
  grpcCall,
  grpcStream,
  healthStatus,
  hpack,
  message,
  outcome,
  rawH2,
  sleep,
} from "./support.js";

const VERIFY = "/latchkey.v1.KeyService/VerifyKey";
const MIB = 1 << 20;
/** 64 MiB of zeros in about 64 KB. */
const BOMB = gzipSync(Buffer.alloc(64 * MIB));

/** Resolves with the response headers, or with null if none came within `ms` (the server is still reading). */
function responseWithin<T>(p: Promise<T>, ms = 5000): Promise<T | null> {
  return Promise.race([p, sleep(ms).then(() => null)]);
}

/** An HTTP/1.1 request whose body is started and never finished; resolves with status and body, or null. */
async function h1Unfinished(port: number, path: string, headers: Record<string, string>, first: Buffer): Promise<{ status: number; body: string; continued: boolean } | null> {
  let continued = false;
  const req = http.request({ host: "127.0.0.1", port, method: "POST", path, headers });
  req.on("error", () => undefined);
  req.on("continue", () => (continued = true));
  const res = new Promise<{ status: number; body: string; continued: boolean }>((resolve) =>
    req.on("response", (r) => {
      let body = "";
      r.on("data", (d: Buffer) => (body += d.toString()));
      r.on("end", () => resolve({ status: r.statusCode!, body, continued }));
      r.on("error", () => resolve({ status: r.statusCode!, body, continued }));
    }),
  );
  if (!headers.expect) req.write(first);
  else req.flushHeaders();
  const out = await responseWithin(res);
  req.destroy();
  return out;
}

/** An HTTP/2 request whose body is started and never finished; resolves with its outcome, or null. */
async function h2Unfinished(port: number, headers: http2.OutgoingHttpHeaders, first: Buffer) {
  const c = connect(port);
  const s = c.request({ ":method": "POST", ":path": VERIFY, ...headers });
  s.on("error", () => undefined);
  const o = outcome(s);
  s.write(first);
  const out = await responseWithin(o);
  c.destroy();
  return out;
}

describe("with the default limits", () => {
  let server: ServerProcess;
  let rootKey: string;
  beforeAll(async () => {
    server = await startServer();
    rootKey = server.bootstrapKey!;
  });
  afterAll(async () => {
    await server?.stop();
  });

  describe("without a root key, the answer comes before the body is read, on every protocol", () => {
    const first = BOMB.subarray(0, 64 * 1024);
    const grpcPrefix = Buffer.alloc(5);
    grpcPrefix[0] = 1;
    grpcPrefix.writeUInt32BE(BOMB.length, 1);

    it("gRPC with grpc-encoding gzip (HTTP/2): UNAUTHENTICATED, trailers-only", async () => {
      const o = await h2Unfinished(server.port, { "content-type": "application/grpc", "grpc-encoding": "gzip", te: "trailers" }, Buffer.concat([grpcPrefix, first]));
      expect(o, "no answer while the body was still coming").not.toBeNull();
      expect(o!.headers[":status"]).toBe(200);
      expect(o!.status).toBe("16");
    });

    it("gRPC-Web (HTTP/2 and HTTP/1.1): UNAUTHENTICATED in the headers", async () => {
      const o = await h2Unfinished(server.port, { "content-type": "application/grpc-web+proto" }, Buffer.concat([grpcPrefix, first]));
      expect(o).not.toBeNull();
      expect(o!.headers["grpc-status"]).toBe("16");
      const h1 = await h1Unfinished(server.port, VERIFY, { "content-type": "application/grpc-web+proto", "content-length": String(BOMB.length + 5) }, Buffer.concat([grpcPrefix, first]));
      expect(h1).not.toBeNull();
      expect(h1!.status).toBe(200);
    });

    it("Connect JSON with content-encoding gzip (HTTP/2): HTTP 401 with the JSON error", async () => {
      const o = await h2Unfinished(server.port, { "content-type": "application/json", "content-encoding": "gzip" }, first);
      expect(o).not.toBeNull();
      expect(o!.headers[":status"]).toBe(401);
      expect(JSON.parse(o!.data.toString())).toMatchObject({ code: "unauthenticated" });
    });

    it("Connect proto and JSON with content-encoding gzip (HTTP/1.1): HTTP 401", async () => {
      for (const ct of ["application/proto", "application/json"]) {
        const r = await h1Unfinished(server.port, VERIFY, { "content-type": ct, "content-encoding": "gzip", "content-length": String(BOMB.length) }, first);
        expect(r, `${ct}: no answer while the body was still coming`).not.toBeNull();
        expect(r!.status).toBe(401);
        expect(JSON.parse(r!.body)).toMatchObject({ code: "unauthenticated" });
      }
    });

    it("a 200 MiB HTTP/1.1 body: HTTP 401 after the first megabyte", async () => {
      const r = await h1Unfinished(server.port, VERIFY, { "content-type": "application/json", "content-length": String(200 * MIB) }, Buffer.alloc(MIB, 0x61));
      expect(r).not.toBeNull();
      expect(r!.status).toBe(401);
    });

    it("Expect: 100-continue is answered 401, without 100 Continue, so the body is never sent", async () => {
      const r = await h1Unfinished(server.port, VERIFY, { "content-type": "application/json", "content-length": String(200 * MIB), expect: "100-continue" }, Buffer.alloc(0));
      expect(r).not.toBeNull();
      expect(r!.status).toBe(401);
      expect(r!.continued).toBe(false);
    });

    it("a bad root key is refused the same way", async () => {
      const o = await h2Unfinished(
        server.port,
        { "content-type": "application/grpc", te: "trailers", authorization: "Bearer lkroot_notakey" },
        Buffer.concat([Buffer.from([0, 0, 0x10, 0, 0]), Buffer.alloc(1000)]),
      );
      expect(o).not.toBeNull();
      expect(o!.status).toBe("16");
    });
  });

  describe("messages are limited after decompression, in both directions", () => {
    const tooLarge = /larger than/;

    it("a gzip bomb with a root key is RESOURCE_EXHAUSTED, inflated no further than the limit (Connect JSON, HTTP/1.1)", async () => {
      const res = await fetch(`${server.baseUrl}${VERIFY}`, {
        method: "POST",
        headers: { "content-type": "application/json", "content-encoding": "gzip", authorization: `Bearer ${rootKey}` },
        body: BOMB,
      });
      expect(res.status).toBe(429);
      const body = (await res.json()) as { code: string; message: string };
      expect(body.code).toBe("resource_exhausted");
      // zlib's maxOutputLength stopped inflating at the limit (Connect-Node's message for it).
      expect(body.message).toMatch(/larger than configured readMaxBytes 4194304 after decompression/);
    });

    it("a gzip bomb with a root key is RESOURCE_EXHAUSTED (gRPC with grpc-encoding gzip, and gRPC-Web)", async () => {
      for (const ct of ["application/grpc", "application/grpc-web+proto"]) {
        const o = await grpcCall(server.port, VERIFY, envelope(BOMB, 1), { "content-type": ct, "grpc-encoding": "gzip", authorization: `Bearer ${rootKey}` });
        // gRPC-Web carries the status in a trailer frame of the body, or in the headers when there is no body.
        const trailer = ct.includes("web") && o.status === undefined ? webTrailer(o.data) : { status: o.status, message: o.message };
        expect(trailer.status, ct).toBe("8");
        expect(trailer.message).toMatch(/after decompression/);
      }
    });

    it("an 8 MiB Connect JSON body with a root key is RESOURCE_EXHAUSTED (HTTP/1.1 and HTTP/2, plain and gzipped)", async () => {
      const json = Buffer.from(JSON.stringify({ key: "sk_" + "a".repeat(8 * MIB) }));
      for (const gz of [false, true]) {
        const headers: Record<string, string> = { "content-type": "application/json", authorization: `Bearer ${rootKey}` };
        if (gz) headers["content-encoding"] = "gzip";
        const res = await fetch(`${server.baseUrl}${VERIFY}`, { method: "POST", headers, body: gz ? gzipSync(json) : json });
        expect(res.status, `gzip ${gz}`).toBe(429);
        expect(((await res.json()) as { message: string }).message).toMatch(tooLarge);
      }
      const c = connect(server.port);
      const s = c.request({ ":method": "POST", ":path": VERIFY, "content-type": "application/json", authorization: `Bearer ${rootKey}` });
      const o = outcome(s);
      s.end(json);
      expect((await o).headers[":status"]).toBe(429);
      c.close();
    });

    it("a gRPC message announced larger than 4 MiB is refused from its prefix (lean path)", async () => {
      const c = connect(server.port);
      const s = grpcStream(c, VERIFY, { authorization: `Bearer ${rootKey}` });
      const o = outcome(s);
      const prefix = Buffer.alloc(5);
      prefix.writeUInt32BE(4 * MIB + 1, 1);
      s.write(prefix); // and nothing more: the answer does not wait for the message
      const r = await responseWithin(o);
      expect(r).not.toBeNull();
      expect(r!.status).toBe("8");
      c.destroy();
    });

    it("the public services take far smaller messages: a 100 KiB health Check is RESOURCE_EXHAUSTED", async () => {
      const o = await grpcCall(server.port, "/grpc.health.v1.Health/Check", envelope(Buffer.alloc(100 * 1024)));
      expect(o.status).toBe("8");
      const res = await fetch(`${server.baseUrl}/grpc.health.v1.Health/Check`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ service: "x".repeat(100 * 1024) }),
      });
      expect(res.status).toBe(429);
    });
  });

  it("advertises 100 concurrent streams per connection and refuses the 101st with REFUSED_STREAM", async () => {
    const c = connect(server.port);
    await new Promise((r) => c.once("remoteSettings", r));
    expect(c.remoteSettings.maxConcurrentStreams).toBe(100);
    c.close();

    // node:http2 queues streams past the limit itself; a raw client does not. 101
    // health Checks whose request never ends: each holds its stream open.
    const open101 = async (ackSettings: boolean) => {
      const raw = await rawH2(server.port);
      raw.send(Buffer.concat([PREFACE, frame(FRAME.SETTINGS, 0, 0)]));
      await eventually(() => raw.frames.some((f) => f.type === FRAME.SETTINGS && !(f.flags & FLAG.ACK)), "server SETTINGS");
      if (ackSettings) raw.send(frame(FRAME.SETTINGS, FLAG.ACK, 0));
      for (let i = 0; i < 101; i++) {
        const block = hpack([
          [":method", "POST"],
          [":scheme", "http"],
          [":authority", "x"],
          [":path", "/grpc.health.v1.Health/Check"],
          ["content-type", "application/grpc"],
        ]);
        raw.send(frame(FRAME.HEADERS, FLAG.END_HEADERS, 1 + 2 * i, block));
      }
      return raw;
    };
    // Before the client acknowledged the limit: the 101st stream alone is refused.
    const early = await open101(false);
    await eventually(() => early.frames.some((f) => f.type === FRAME.RST_STREAM), "a RST_STREAM");
    expect(early.frames.filter((f) => f.type === FRAME.RST_STREAM).map((f) => [f.streamId, f.payload.readUInt32BE(0)])).toEqual([
      [201, http2.constants.NGHTTP2_REFUSED_STREAM],
    ]);
    early.socket.destroy();
    // After it acknowledged the limit, exceeding it is a protocol violation (nghttp2
    // treats it as a connection error): the connection is closed, the server stays.
    const late = await open101(true);
    await late.closed;
    const goaway = late.frames.find((f) => f.type === FRAME.GOAWAY);
    expect(goaway?.payload.readUInt32BE(0)).toBe(199); // the last stream it took: the 100th
    expect(await healthStatus(server.port)).toBe("0");
  });
});

/** The grpc-status and grpc-message of a gRPC-Web response body's trailer frame (or of its headers). */
function webTrailer(data: Buffer): { status?: string; message?: string } {
  for (let i = 0; i + 5 <= data.length; ) {
    const n = data.readUInt32BE(i + 1);
    if (data[i] & 0x80) {
      const text = data.subarray(i + 5, i + 5 + n).toString();
      const get = (k: string) => /^(.*?):\s*(.*)$/m.exec(text.split("\r\n").find((l) => l.toLowerCase().startsWith(k + ":")) ?? "")?.[2];
      return { status: get("grpc-status"), message: decodeURIComponent(get("grpc-message") ?? "") };
    }
    i += 5 + n;
  }
  return {};
}

describe("with short timeouts, silent and half-open connections are closed", () => {
  let server: ServerProcess;
  beforeAll(async () => {
    server = await startServer({
      env: { LATCHKEY_HEADERS_TIMEOUT_MS: "300", LATCHKEY_REQUEST_TIMEOUT_MS: "600", LATCHKEY_IDLE_TIMEOUT_MS: "800" },
    });
  });
  afterAll(async () => {
    await server?.stop();
  });

  /** Opens a socket, writes `first`, and resolves once the server closed it (fails after 10 s). */
  async function closedByServer(first: Buffer | null): Promise<string> {
    const s = net.connect(server.port, "127.0.0.1");
    s.on("error", () => undefined);
    let received = "";
    s.on("data", (d: Buffer) => (received += d.toString("latin1")));
    await new Promise((r) => s.once("connect", r));
    if (first) s.write(first);
    const closed = new Promise<void>((r) => s.once("close", () => r()));
    const done = await responseWithin(closed.then(() => true), 10_000);
    s.destroy();
    expect(done, "the server kept the connection open").toBe(true);
    return received;
  }

  it("a connection that sends nothing", async () => {
    await closedByServer(null);
  });

  it("half-sent HTTP/1.1 headers (HTTP 408)", async () => {
    expect(await closedByServer(Buffer.from("POST /latchkey.v1.KeyService/VerifyKey HTTP/1.1\r\nHost: x\r\n"))).toMatch(/^HTTP\/1.1 408/);
  });

  it("the HTTP/2 preface without SETTINGS", async () => {
    await closedByServer(PREFACE);
  });

  it("an HTTP/2 connection without calls, after the idle timeout (GOAWAY)", async () => {
    const received = await closedByServer(Buffer.concat([PREFACE, frame(FRAME.SETTINGS, 0, 0)]));
    expect(received.length).toBeGreaterThan(0);
  });

  it("an HTTP/2 connection that sends only PINGs, after the idle timeout: pings are not calls", async () => {
    const c = connect(server.port);
    c.on("error", () => undefined);
    const closed = new Promise<void>((r) => c.once("close", () => r()));
    let pongs = 0;
    const pinger = setInterval(() => {
      if (!c.closed && !c.destroyed) c.ping((err) => (err ? undefined : pongs++));
    }, 100);
    try {
      expect(await responseWithin(closed.then(() => true), 10_000), "the pinging connection stayed open").toBe(true);
      expect(pongs, "the server answered no ping before closing").toBeGreaterThan(0);
    } finally {
      clearInterval(pinger);
      c.destroy();
    }
  });

  it("an idle HTTP/1.1 keep-alive connection after a response", async () => {
    const received = await closedByServer(Buffer.from("GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n"));
    expect(received).toMatch(/^HTTP\/1.1 401/);
  });

  it("a gRPC call whose message stops halfway is reset after the request timeout", async () => {
    const c = connect(server.port);
    const s = grpcStream(c, VERIFY, { authorization: `Bearer ${server.bootstrapKey}` });
    const o = outcome(s);
    s.write(message(VerifyKeyRequestSchema, { key: "x".repeat(100) }).subarray(0, 50));
    const r = await responseWithin(o, 10_000);
    expect(r, "the stream was never reset").not.toBeNull();
    expect(r!.rstCode).toBe(http2.constants.NGHTTP2_CANCEL);
    c.close();
  });

  it("a quiet health Watch outlives the idle timeout; once it ends, its idle connection is closed", async () => {
    const c = connect(server.port);
    const closed = new Promise<void>((r) => c.once("close", () => r()));
    const w = grpcStream(c, "/grpc.health.v1.Health/Watch");
    const first = new Promise((r) => w.once("data", r));
    w.end(envelope(new Uint8Array(0)));
    await first;
    await sleep(2000); // well past the idle (800 ms) and request (600 ms) timeouts
    expect(w.closed).toBe(false);
    const s = grpcStream(c, "/grpc.health.v1.Health/Check");
    const o = outcome(s);
    s.end(envelope(new Uint8Array(0)));
    expect((await o).status).toBe("0");
    w.close(http2.constants.NGHTTP2_CANCEL);
    expect(await responseWithin(closed.then(() => true), 10_000), "the idle connection stayed open").toBe(true);
  });
});

describe("caps on health watchers and response size", () => {
  let server: ServerProcess;
  beforeAll(async () => {
    server = await startServer({
      env: { LATCHKEY_MAX_HEALTH_WATCHERS: "3", LATCHKEY_MAX_MESSAGE_BYTES: "2048" },
    });
  });
  afterAll(async () => {
    await server?.stop();
  });

  it("refuses the 4th concurrent health Watch with RESOURCE_EXHAUSTED; Check still answers; a freed slot is reused", async () => {
    const c = connect(server.port);
    const watch = () => {
      const w = grpcStream(c, "/grpc.health.v1.Health/Watch");
      const o = outcome(w);
      const first = new Promise<"serving" | "closed">((r) => {
        w.once("data", () => r("serving"));
        w.once("close", () => r("closed"));
      });
      w.end(envelope(new Uint8Array(0)));
      return { w, o, first };
    };
    const open = [watch(), watch(), watch()];
    for (const x of open) expect(await x.first).toBe("serving");
    const fourth = watch();
    expect(await fourth.first).toBe("closed");
    expect((await fourth.o).status).toBe("8");
    expect(await healthStatus(server.port)).toBe("0");
    open[0].w.close(http2.constants.NGHTTP2_CANCEL);
    await eventually(async () => (await watch().first) === "serving", "a Watch accepted after one went away");
    c.destroy();
  });

  it("a response larger than LATCHKEY_MAX_MESSAGE_BYTES is RESOURCE_EXHAUSTED (gRPC lean path and Connect)", async () => {
    const auth = { authorization: `Bearer ${server.bootstrapKey}` };
    for (let i = 0; i < 8; i++) {
      const o = await grpcCall(server.port, "/latchkey.v1.KeyService/CreateKey", message(CreateKeyRequestSchema, { apiId: "big", name: "n".repeat(250) + i }), auth);
      expect(o.status, o.message).toBe("0");
    }
    const o = await grpcCall(server.port, "/latchkey.v1.KeyService/ListKeys", message(ListKeysRequestSchema, { apiId: "big" }), auth);
    expect(o.status).toBe("8");
    expect(o.message).toMatch(/larger than/);
    const res = await fetch(`${server.baseUrl}/latchkey.v1.KeyService/ListKeys`, {
      method: "POST",
      headers: { "content-type": "application/json", ...auth },
      body: JSON.stringify({ apiId: "big" }),
    });
    expect(res.status).toBe(429);
  });
});

describe("a cap on connections", () => {
  let server: ServerProcess;
  beforeAll(async () => {
    server = await startServer({ env: { LATCHKEY_MAX_CONNECTIONS: "5" } });
  });
  afterAll(async () => {
    await server?.stop();
  });

  it("past LATCHKEY_MAX_CONNECTIONS, closes a newcomer when every connection has sent a request", async () => {
    const sessions: http2.ClientHttp2Session[] = [];
    for (let i = 0; i < 5; i++) {
      const c = connect(server.port);
      const s = grpcStream(c, "/grpc.health.v1.Health/Check");
      const o = outcome(s);
      s.end(envelope(new Uint8Array(0)));
      expect((await o).status).toBe("0");
      sessions.push(c);
    }
    const extra = net.connect(server.port, "127.0.0.1");
    extra.on("error", () => undefined);
    await new Promise<void>((r) => extra.once("close", () => r()));
    expect(sessions.every((c) => !c.closed && !c.destroyed)).toBe(true);
    sessions.pop()!.destroy();
    await eventually(async () => (await healthStatus(server.port)) === "0", "a health Check on a new connection");
    for (const c of sessions) c.destroy();
  });

  it("past LATCHKEY_MAX_CONNECTIONS, closes the oldest connection that never sent a request, so a newcomer is served", async () => {
    const silent: { s: net.Socket; closed: boolean }[] = [];
    for (let i = 0; i < 5; i++) {
      const s = net.connect(server.port, "127.0.0.1");
      const entry = { s, closed: false };
      s.on("error", () => undefined);
      s.on("close", () => (entry.closed = true));
      await new Promise((r) => s.once("connect", r));
      silent.push(entry);
    }
    await eventually(async () => (await healthStatus(server.port)) === "0", "a health Check while silent connections fill the cap");
    await eventually(() => silent[0].closed, "the oldest silent connection closed");
    for (const x of silent) x.s.destroy();
  });
});

describe("with TLS and a short headers timeout, silent connections are closed", () => {
  let server: ServerProcess;
  beforeAll(async () => {
    const dir = tempDir("tls");
    const cert = path.join(dir, "cert.pem");
    const key = path.join(dir, "key.pem");
    execFileSync("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", key, "-out", cert], { stdio: "ignore" });
    server = await startServer({ env: { LATCHKEY_TLS_CERT: cert, LATCHKEY_TLS_KEY: key, LATCHKEY_HEADERS_TIMEOUT_MS: "300", LATCHKEY_REQUEST_TIMEOUT_MS: "600" } });
  });
  afterAll(async () => {
    await server?.stop();
  });

  const closes = (s: net.Socket) => {
    s.resume(); // read what the server sends, so its close is seen
    return responseWithin(new Promise<boolean>((r) => s.once("close", () => r(true))), 10_000);
  };

  it("a connection that never starts the TLS handshake", async () => {
    const s = net.connect(server.port, "127.0.0.1");
    s.on("error", () => undefined);
    expect(await closes(s), "the server kept the connection open").toBe(true);
  });

  it("a TLS connection that then sends nothing, whether it chose HTTP/2 or HTTP/1.1", async () => {
    for (const alpn of ["h2", "http/1.1"]) {
      const s = tls.connect({ host: "127.0.0.1", port: server.port, rejectUnauthorized: false, ALPNProtocols: [alpn] });
      s.on("error", () => undefined);
      await new Promise((r) => s.once("secureConnect", r));
      expect(s.alpnProtocol).toBe(alpn);
      expect(await closes(s), `${alpn}: the server kept the connection open`).toBe(true);
    }
  });
});
