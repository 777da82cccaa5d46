import { Code, ConnectError } from "@connectrpc/connect";
import { codeToHttpStatus, endStreamToJson, errorToJsonBytes } from "@connectrpc/connect/protocol-connect";
import { setTrailerStatus } from "@connectrpc/connect/protocol-grpc";
import type http from "node:http";
import http2 from "node:http2";

/*
 * What a request must pass before any byte of its body is read: the transport
 * reads the path and the headers, and either lets the request through to the
 * lean gRPC path or Connect-Node, or answers it at once in its own protocol's
 * form (see README, "The front door").
 */

/** Services that answer without a root key. */
export const PUBLIC_SERVICES: ReadonlySet<string> = new Set([
  "grpc.health.v1.Health",
  "grpc.reflection.v1.ServerReflection",
  "grpc.reflection.v1alpha.ServerReflection",
]);

/** The service part of a request path: "/pkg.Service/Method?x" → "pkg.Service" ("" if the path has none). */
export function serviceOf(path: string | undefined): string {
  if (!path || path.charCodeAt(0) !== 47 /* "/" */) return "";
  const end = path.indexOf("/", 1);
  return end < 0 ? "" : path.slice(1, end);
}

/** How a request expects to be answered, from its content type. */
export type WireProtocol = "grpc" | "grpc-web" | "connect-stream" | "connect-unary";

export function protocolOf(contentType: string | undefined): WireProtocol {
  const ct = (contentType ?? "").toLowerCase();
  if (ct.startsWith("application/grpc-web")) return "grpc-web";
  if (ct.startsWith("application/grpc")) return "grpc";
  if (ct.startsWith("application/connect+")) return "connect-stream";
  // Connect unary (application/json, application/proto), GET requests and anything else.
  return "connect-unary";
}

/** A complete response: status, headers and an optional body. */
export interface EarlyAnswer {
  status: number;
  headers: Record<string, string>;
  body: Uint8Array | null;
}

/**
 * The error response a client of `protocol` understands: gRPC and gRPC-Web get
 * a trailers-only response (HTTP 200, grpc-status in the headers), Connect
 * unary an HTTP status with the JSON error, Connect streaming an end-of-stream
 * message carrying the error.
 */
/**
 * The gRPC status headers of `err`: grpc-status, grpc-message and
 * grpc-status-details-bin as Connect writes them, except grpc-message, which is
 * percent-encoded as the gRPC spec says (only bytes outside printable ASCII and
 * "%"). Connect encodes it with encodeURIComponent, and grpc-js, which decodes
 * with decodeURI, then shows "api_id%3A …" for "api_id: …".
 */
export function grpcStatusHeaders(err: ConnectError, trailer?: Headers): Record<string, string> {
  const out: Record<string, string> = {};
  // As Connect-Node: the error's metadata is appended to the trailers a handler set.
  setTrailerStatus(new Headers(trailer), err).forEach((v, k) => (out[k] = v));
  if (out["grpc-message"] !== undefined) out["grpc-message"] = err.rawMessage.replace(/[^\x20-\x24\x26-\x7e]/gu, (c) => encodeURIComponent(c));
  return out;
}

export function errorAnswer(protocol: WireProtocol, contentType: string | undefined, err: ConnectError): EarlyAnswer {
  switch (protocol) {
    case "grpc":
    case "grpc-web": {
      const headers: Record<string, string> = { "content-type": contentType ?? `application/${protocol}+proto` };
      Object.assign(headers, grpcStatusHeaders(err));
      return { status: 200, headers, body: null };
    }
    case "connect-stream": {
      const json = new TextEncoder().encode(JSON.stringify(endStreamToJson(err.metadata, err, undefined)));
      const body = new Uint8Array(5 + json.length);
      body[0] = 0b10; // end-stream flag
      new DataView(body.buffer).setUint32(1, json.length);
      body.set(json, 5);
      return { status: 200, headers: { "content-type": contentType ?? "application/connect+json" }, body };
    }
    case "connect-unary": {
      const headers: Record<string, string> = { "content-type": "application/json" };
      err.metadata.forEach((v, k) => (headers[k] = v));
      return { status: codeToHttpStatus(err.code), headers, body: errorToJsonBytes(err, {}) };
    }
  }
}

const { NGHTTP2_NO_ERROR, NGHTTP2_STREAM_STATE_OPEN, NGHTTP2_STREAM_STATE_HALF_CLOSED_LOCAL } = http2.constants;

/** True while the client may still send on this stream (the request is not complete). */
export function clientStillSending(stream: http2.ServerHttp2Stream): boolean {
  try {
    const s = stream.state.state;
    return s === NGHTTP2_STREAM_STATE_OPEN || s === NGHTTP2_STREAM_STATE_HALF_CLOSED_LOCAL;
  } catch {
    return false; // no handle: the stream is gone
  }
}

/**
 * A complete answer is on its way to a client that is still sending: once our
 * END_STREAM has left, ask it to stop (RST_STREAM NO_ERROR, RFC 9113 §8.1) —
 * after the answer, never in the same write: a client that reads both at once
 * may report the reset instead of the answer (connect-go over TLS did, in 26 of
 * 30 runs, when the lean path sent them together). A client that finishes its
 * request meanwhile is not reset at all; one that neither finishes nor lets our
 * END_STREAM out within ~1 s is left to the request timeout.
 */
export function stopUpload(stream: http2.ServerHttp2Stream): void {
  let tries = 0;
  const check = () => {
    if (stream.closed || stream.destroyed) return;
    let state: number | undefined;
    try {
      state = stream.state.state;
    } catch {
      return; // no handle: the stream is gone
    }
    if (state === NGHTTP2_STREAM_STATE_HALF_CLOSED_LOCAL) stream.close(NGHTTP2_NO_ERROR);
    else if (state === NGHTTP2_STREAM_STATE_OPEN && ++tries < 100) setTimeout(check, tries < 3 ? 0 : 10);
  };
  setImmediate(check);
}

/**
 * Answers an HTTP/2 stream with `err` without reading its body, then asks the
 * client to stop sending (stopUpload). Never throws: a stream that is already
 * gone is left alone.
 */
export function refuseStream(stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders, err: ConnectError): void {
  if (stream.destroyed || stream.closed || stream.headersSent) return;
  const ct = headers["content-type"];
  const a = errorAnswer(protocolOf(ct), ct, err);
  const sending = clientStillSending(stream);
  try {
    if (a.body) {
      stream.respond({ ":status": a.status, ...a.headers, "content-length": String(a.body.length) });
      stream.end(a.body);
    } else {
      stream.respond({ ":status": a.status, ...a.headers }, { endStream: true });
    }
    if (sending) stopUpload(stream);
  } catch {
    stream.destroy();
  }
}

/**
 * Answers an HTTP/1.1 request with `err` without reading its body. The
 * connection is closed after the response when the body was not read, so the
 * rest of it is never read either (http-server.ts, Http1Response).
 */
export function refuseHttp1(req: http.IncomingMessage, res: http.ServerResponse, err: ConnectError): void {
  if (res.headersSent || res.destroyed) return;
  const ct = req.headers["content-type"];
  const a = errorAnswer(protocolOf(ct), ct, err);
  try {
    res.writeHead(a.status, { ...a.headers, "content-length": String(a.body?.length ?? 0) });
    res.end(a.body ?? undefined);
  } catch {
    res.destroy();
  }
}

/** The error refusing a request whose message would be larger than `limit`. */
export function tooLarge(what: string, size: number, limit: number): ConnectError {
  return new ConnectError(`${what} size ${size} is larger than the limit of ${limit} bytes`, Code.ResourceExhausted);
}
