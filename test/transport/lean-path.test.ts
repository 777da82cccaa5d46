/**
 * What the lean gRPC path writes besides the message: error details and error
 * metadata, response headers and trailers set by a handler (on success and on
 * error), binary metadata, and the statuses for malformed framing — the same
 * as Connect-Node answers them.
 */
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import { StringValueSchema } from "@bufbuild/protobuf/wkt";
import { Code } from "@connectrpc/connect";
import { findTrailerError } from "@connectrpc/connect/protocol-grpc";
import { beforeAll, describe, expect, it } from "vitest";
import { GetKeyRequestSchema } from "../../gen/latchkey/v1/key_service_pb.js";
import { connect, envelope, grpcCall, message, outcome, startFixture, type Fixture } from "./support.js";

const GET = "/latchkey.v1.KeyService/GetKey";
const AUTH = { authorization: "Bearer good" };

function asHeaders(h: Record<string, unknown>): Headers {
  const out = new Headers();
  for (const [k, v] of Object.entries(h)) if (!k.startsWith(":") && typeof v === "string") out.set(k, v);
  return out;
}

describe("the lean gRPC path", () => {
  let fx: Fixture;
  beforeAll(async () => {
    fx = await startFixture();
  });

  it("sends an error's details (grpc-status-details-bin) and metadata", async () => {
    const o = await grpcCall(fx.port, GET, message(GetKeyRequestSchema, { id: "fail" }), AUTH);
    expect(o.status).toBe(String(Code.InvalidArgument));
    expect(o.message).toBe("bad id");
    expect(o.headers["x-fixture"]).toBe("failed");
    const err = findTrailerError(asHeaders(o.headers));
    expect(err?.code).toBe(Code.InvalidArgument);
    expect(err?.details).toHaveLength(1);
    const detail = err!.details[0] as { type: string; value: Uint8Array };
    expect(detail.type).toBe("google.protobuf.StringValue");
    expect(fromBinary(StringValueSchema, detail.value).value).toBe("id");
  });

  it("sends the response headers and trailers a handler set", async () => {
    const o = await grpcCall(fx.port, GET, message(GetKeyRequestSchema, { id: "meta" }), AUTH);
    expect(o.status).toBe("0");
    expect(o.headers["x-fixture-header"]).toBe("h");
    expect(o.trailers["x-fixture-trailer"]).toBe("t");
  });

  it("an error keeps the headers and trailers its handler set: the headers in a frame of their own, then the status with the trailers and the error's metadata", async () => {
    const o = await grpcCall(fx.port, GET, message(GetKeyRequestSchema, { id: "meta-fail" }), { ...AUTH, "x-want-served-by": "1" });
    expect(o.headers["x-served-by"]).toBe("lean");
    expect(o.headers["x-fixture-header"]).toBe("h");
    expect(o.headers["grpc-status"]).toBeUndefined();
    expect(o.trailers["grpc-status"]).toBe(String(Code.InvalidArgument));
    expect(o.trailers["x-fixture-trailer"]).toBe("t");
    expect(o.trailers["x-fixture"]).toBe("failed");
    expect(findTrailerError(asHeaders(o.trailers))?.details).toHaveLength(1);
  });

  it("an error whose handler set trailers only is one trailers-only response carrying them", async () => {
    const o = await grpcCall(fx.port, GET, message(GetKeyRequestSchema, { id: "trailer-fail" }), AUTH);
    expect(o.headers["grpc-status"]).toBe(String(Code.InvalidArgument));
    expect(o.headers["x-fixture-trailer"]).toBe("t");
    expect(o.headers["x-fixture"]).toBe("failed");
    expect(o.trailers).toEqual({});
  });

  /** GetKey with `md` (plus the root key and the served-by marker) through grpc-js: its response headers and status. */
  async function getKeyWith(options: grpc.ClientOptions, id: string, md: grpc.Metadata): Promise<{ headers: grpc.Metadata | undefined; status: grpc.StatusObject }> {
    const client = new grpc.Client(`127.0.0.1:${fx.port}`, grpc.credentials.createInsecure(), options);
    md.set("authorization", "Bearer good");
    md.set("x-want-served-by", "1");
    const bytes = Buffer.from(toBinary(GetKeyRequestSchema, create(GetKeyRequestSchema, { id })));
    let headers: grpc.Metadata | undefined;
    const status = await new Promise<grpc.StatusObject>((resolve) => {
      const call = client.makeUnaryRequest(GET, (x: Buffer) => x, (x: Buffer) => x, bytes, md, () => undefined);
      call.on("metadata", (m) => (headers = m));
      call.on("status", resolve);
    });
    client.close();
    return { headers, status };
  }

  // The lean path takes identity calls; grpc-js with gzip goes to Connect-Node. Both must agree.
  for (const [path, options] of [
    ["lean", {}],
    ["connect", { "grpc.default_compression_algorithm": 2 }],
  ] as const) {
    it(`grpc-js (${path} path): a failed call's headers arrive as headers, its trailers and error metadata as the status's metadata`, async () => {
      const { headers, status } = await getKeyWith(options, "meta-fail", new grpc.Metadata());
      expect(headers?.get("x-served-by")).toEqual([path]);
      expect(headers?.get("x-fixture-header")).toEqual(["h"]);
      expect(status.code).toBe(grpc.status.INVALID_ARGUMENT);
      expect(status.metadata.get("x-fixture-trailer")).toEqual(["t"]);
      expect(status.metadata.get("x-fixture")).toEqual(["failed"]);
    });

    it(`grpc-js (${path} path): a handler sees the request's headers as a Headers (a repeated header joined, names in any case)`, async () => {
      const md = new grpc.Metadata();
      md.add("x-multi", "a");
      md.add("x-multi", "b, c");
      md.set("x-one", "1");
      const { headers, status } = await getKeyWith(options, "echo-headers", md);
      expect(status.code).toBe(grpc.status.OK);
      expect(headers?.get("x-served-by")).toEqual([path]);
      expect(JSON.parse(String(headers?.get("x-seen")[0]))).toEqual({
        first: { multi: "a, b, c", upper: "a, b, c", none: null, auth: "Bearer good" },
        list: [["x-multi", "a, b, c"], ["x-one", "1"]],
        has: true,
        again: "a, b, c",
      });
    });

    it(`grpc-js (${path} path): binary metadata (every byte value, two values of one key) comes back byte for byte in headers and trailers`, async () => {
      const md = new grpc.Metadata();
      const a = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
      const b = Buffer.from([0xff, 0x00, 0x2c, 0x20, 0x0a]);
      md.add("x-echo-bin", a);
      md.add("x-echo-bin", b);
      const { headers, status } = await getKeyWith(options, "echo-bin", md);
      expect(status.code).toBe(grpc.status.OK);
      expect(headers?.get("x-served-by")).toEqual([path]);
      expect(headers?.get("x-echo-bin")).toEqual([a, b]);
      expect(status.metadata.get("x-echo-trailer-bin")).toEqual([a, b]);
    });
  }

  it("answers malformed framing as Connect-Node does", async () => {
    const body = message(GetKeyRequestSchema, { id: "x" });
    const cases: [string, Buffer, Code][] = [
      ["no message", Buffer.alloc(0), Code.Unimplemented],
      ["two messages", Buffer.concat([body, body]), Code.Unimplemented],
      ["an incomplete message", body.subarray(0, body.length - 1), Code.InvalidArgument],
      ["a compressed message without grpc-encoding", envelope(body.subarray(5), 1), Code.Internal],
      ["bytes that are not the request message", envelope(Buffer.from([0xff, 0xff, 0xff])), Code.Internal],
    ];
    for (const [what, bytes, code] of cases) {
      const o = await grpcCall(fx.port, GET, bytes, AUTH);
      expect(o.status, what).toBe(String(code));
    }
    await fx.assertAlive();
  });
});

describe("a request with an empty body, after its root key was checked", () => {
  let fx: Fixture;
  beforeAll(async () => {
    fx = await startFixture();
  });

  it("is answered on the lean path, over Connect and over gRPC-Web (HTTP/2)", async () => {
    const grpc = await grpcCall(fx.port, GET, Buffer.alloc(0), AUTH);
    expect(grpc.status).toBe(String(Code.Unimplemented));
    const web = await grpcCall(fx.port, GET, Buffer.alloc(0), { ...AUTH, "content-type": "application/grpc-web+proto" });
    expect(web.headers[":status"]).toBe(200);
    // The empty proto message is a valid Connect request: GetKey with no id.
    const c = connect(fx.port);
    const s = c.request({ ":method": "POST", ":path": GET, "content-type": "application/proto", ...AUTH });
    const o = outcome(s);
    s.end();
    const r = await o;
    expect(r.headers[":status"]).toBe(200);
    c.close();
  });

  it("is answered over Connect on HTTP/1.1", async () => {
    const res = await fetch(`http://127.0.0.1:${fx.port}${GET}`, { method: "POST", headers: { "content-type": "application/proto", ...AUTH }, body: new Uint8Array(0) });
    expect(res.status).toBe(200);
  });
});
