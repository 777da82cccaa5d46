/**
 * No client behaviour ends the process: a client that resets its stream or
 * drops its connection at any stage of a call leaves the server running and
 * answering. The reproduction runs against the real server process;
 * the stages that need a call held in its handler run against the gated
 * fixture (Latchkey's own createServer in a process of its own).
 */
import http from "node:http";
import http2 from "node:http2";
import { afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { GetKeyRequestSchema, VerifyKeyRequestSchema } from "../../gen/latchkey/v1/key_service_pb.js";
import { startServer, type ServerProcess } from "../integration/support.js";
import {
  FLAG,
  FRAME,
  PREFACE,
  connect,
  frame,
  grpcStream,
  healthStatus,
  hpack,
  message,
  outcome,
  rawH2,
  sleep,
  startFixture,
  type Fixture,
} from "./support.js";

const { NGHTTP2_CANCEL } = http2.constants;
const VERIFY = "/latchkey.v1.KeyService/VerifyKey";

describe("the real server survives", () => {
  let server: ServerProcess;
  // A server of its own for each test: one that died must not fail the next.
  beforeEach(async () => {
    server = await startServer();
  });
  afterEach(async () => {
    await server?.stop();
  });

  const alive = async () => {
    expect(server.proc.exitCode, server.stderr()).toBeNull();
    expect(await healthStatus(server.port)).toBe("0");
  };

  /** Issue 8, item 1: frames announcing 1000 bytes, 100 sent, then the session destroyed. */
  async function reproduce(rootKey: string | null) {
    for (let i = 0; i < 5; i++) {
      const c = connect(server.port);
      for (let j = 0; j < 2; j++) {
        const s = grpcStream(c, VERIFY, rootKey ? { authorization: `Bearer ${rootKey}` } : {});
        const head = Buffer.alloc(5);
        head.writeUInt32BE(1000, 1);
        s.write(Buffer.concat([head, Buffer.alloc(100)]));
      }
      await sleep(300);
      c.destroy();
      await sleep(100);
    }
  }

  it("two streams announcing 1000 bytes and sending 100, then a destroyed session, five times (no root key)", async () => {
    await reproduce(null);
    await alive();
  });

  it("the same with a valid root key (the request reaches the lean path)", async () => {
    await reproduce(server.bootstrapKey!);
    await alive();
  });
});

describe("a client reset at each stage of a call", () => {
  let fx: Fixture;
  let n = 0;
  const id = () => `c${++n}`;
  beforeAll(async () => {
    fx = await startFixture();
  });

  const AUTH = { authorization: "Bearer good" };

  it("HEADERS and RST_STREAM in one packet, before the server saw the stream", async () => {
    const raw = await rawH2(fx.port);
    const block = hpack([
      [":method", "POST"],
      [":scheme", "http"],
      [":authority", "x"],
      [":path", VERIFY],
      ["content-type", "application/grpc"],
      ["authorization", "Bearer good"],
    ]);
    const rst = Buffer.alloc(4);
    rst.writeUInt32BE(NGHTTP2_CANCEL);
    raw.send(Buffer.concat([PREFACE, frame(FRAME.SETTINGS, 0, 0), frame(FRAME.HEADERS, FLAG.END_HEADERS, 1, block), frame(FRAME.RST_STREAM, 0, 1, rst)]));
    await sleep(100);
    raw.socket.destroy();
    await fx.assertAlive();
  });

  it("a header block cut off before END_HEADERS, then the connection dropped", async () => {
    const raw = await rawH2(fx.port);
    const block = hpack([
      [":method", "POST"],
      [":scheme", "http"],
      [":path", VERIFY],
    ]);
    raw.send(Buffer.concat([PREFACE, frame(FRAME.SETTINGS, 0, 0), frame(FRAME.HEADERS, 0, 1, block)]));
    await sleep(100);
    raw.socket.destroy();
    await fx.assertAlive();
  });

  it("reset right after the headers, before any body byte (lean path)", async () => {
    const c = connect(fx.port);
    const s = grpcStream(c, VERIFY, AUTH);
    const o = outcome(s);
    s.close(NGHTTP2_CANCEL);
    await o;
    c.close();
    await fx.assertAlive();
  });

  it("reset halfway through the message (lean path), and the session dropped halfway", async () => {
    for (const how of ["reset", "destroy"] as const) {
      const c = connect(fx.port);
      const s = grpcStream(c, VERIFY, AUTH);
      const o = outcome(s);
      const body = message(VerifyKeyRequestSchema, { key: "x".repeat(200) });
      s.write(body.subarray(0, 100));
      await sleep(50);
      if (how === "reset") s.close(NGHTTP2_CANCEL);
      else c.destroy();
      await o;
      c.destroy();
    }
    await fx.assertAlive();
  });

  it("reset after the request ended, while the handler runs: ctx.signal aborts with CANCELED (lean path)", async () => {
    const call = id();
    const c = connect(fx.port);
    const s = grpcStream(c, VERIFY, AUTH);
    const o = outcome(s);
    s.end(message(VerifyKeyRequestSchema, { key: `gate:${call}` }));
    await fx.waitFor((e) => e.event === "entered" && e.id === call, "entered");
    s.close(NGHTTP2_CANCEL);
    await o;
    expect((await fx.waitFor((e) => e.event === "aborted" && e.id === call, "aborted")).code).toBe("Canceled");
    fx.release(call);
    expect((await fx.waitFor((e) => e.event === "finished" && e.id === call, "finished")).aborted).toBe(true);
    c.close();
    await fx.assertAlive();
  });

  it("the connection dropped while the handler runs: ctx.signal aborts with CANCELED, the late result goes nowhere", async () => {
    const call = id();
    const c = connect(fx.port);
    const s = grpcStream(c, VERIFY, AUTH);
    s.end(message(VerifyKeyRequestSchema, { key: `gate:${call}` }));
    await fx.waitFor((e) => e.event === "entered" && e.id === call, "entered");
    c.destroy();
    expect((await fx.waitFor((e) => e.event === "aborted" && e.id === call, "aborted")).code).toBe("Canceled");
    fx.release(call);
    await fx.waitFor((e) => e.event === "finished" && e.id === call, "finished");
    await fx.assertAlive();
  });

  it("reset while the response is being written (headers received, data held by flow control)", async () => {
    for (const how of ["reset", "destroy"] as const) {
      const c = connect(fx.port, { initialWindowSize: 1024 });
      const s = grpcStream(c, "/latchkey.v1.KeyService/GetKey", AUTH);
      s.pause(); // read nothing: the server's data waits for a window update
      const headers = new Promise((r) => s.once("response", r));
      s.end(message(GetKeyRequestSchema, { id: `big:${1 << 20}` }));
      await headers;
      if (how === "reset") s.close(NGHTTP2_CANCEL);
      else c.destroy();
      await sleep(50);
      c.destroy();
    }
    await fx.assertAlive();
  });

  it("reset while a Connect call's handler runs (HTTP/2, Connect protocol)", async () => {
    const call = id();
    const c = connect(fx.port);
    const s = c.request({ ":method": "POST", ":path": VERIFY, "content-type": "application/json", ...AUTH });
    s.on("error", () => undefined);
    s.end(JSON.stringify({ key: `gate:${call}` }));
    await fx.waitFor((e) => e.event === "entered" && e.id === call, "entered");
    s.close(NGHTTP2_CANCEL);
    expect((await fx.waitFor((e) => e.event === "aborted" && e.id === call, "aborted")).code).toBe("Canceled");
    fx.release(call);
    await fx.waitFor((e) => e.event === "finished" && e.id === call, "finished");
    c.close();
    await fx.assertAlive();
  });

  it("reset during the body and while the handler runs (HTTP/1.1, Connect protocol)", async () => {
    // During the body.
    const partial = http.request({ host: "127.0.0.1", port: fx.port, method: "POST", path: VERIFY, headers: { "content-type": "application/json", "content-length": "1000", ...AUTH } });
    partial.on("error", () => undefined);
    partial.write('{"key":"');
    await sleep(50);
    partial.destroy();
    // While the handler runs.
    const call = id();
    const req = http.request({ host: "127.0.0.1", port: fx.port, method: "POST", path: VERIFY, headers: { "content-type": "application/json", ...AUTH } });
    req.on("error", () => undefined);
    req.end(JSON.stringify({ key: `gate:${call}` }));
    await fx.waitFor((e) => e.event === "entered" && e.id === call, "entered");
    req.destroy();
    await fx.waitFor((e) => e.event === "aborted" && e.id === call, "aborted");
    fx.release(call);
    await fx.waitFor((e) => e.event === "finished" && e.id === call, "finished");
    await fx.assertAlive();
  });

  it("reset while a gRPC-Web call's handler runs (HTTP/2)", async () => {
    const call = id();
    const c = connect(fx.port);
    const s = c.request({ ":method": "POST", ":path": VERIFY, "content-type": "application/grpc-web+proto", ...AUTH });
    s.on("error", () => undefined);
    s.end(message(VerifyKeyRequestSchema, { key: `gate:${call}` }));
    await fx.waitFor((e) => e.event === "entered" && e.id === call, "entered");
    c.destroy();
    await fx.waitFor((e) => e.event === "aborted" && e.id === call, "aborted");
    fx.release(call);
    await fx.waitFor((e) => e.event === "finished" && e.id === call, "finished");
    await fx.assertAlive();
  });
});
