import type { ConnectRouter, Interceptor } from "@connectrpc/connect";
import { connectNodeAdapter, type ConnectNodeAdapterOptions } from "@connectrpc/connect-node";
import { readFileSync } from "node:fs";
import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import tls from "node:tls";
import { VerifyKeyResponseSchema } from "../../gen/latchkey/v1/key_service_pb.js";
import { createGrpcUnaryHandler, type ResponseEncoder, type ServiceRegistration } from "./grpc-unary.js";
import { encodeVerifyKeyResponse } from "./verify-response-encoder.js";

export interface ServerOptions {
  routes: (router: ConnectRouter) => void;
  /** When given, unary gRPC calls to these services take the lean path (grpc-unary.ts). */
  services?: ServiceRegistration[];
  interceptors: Interceptor[];
  tls?: { certFile: string; keyFile: string } | null;
  /** More Connect-Node options (e.g. a JSON type registry for google.protobuf.Any). */
  connect?: Omit<ConnectNodeAdapterOptions, "routes" | "interceptors">;
}

export interface LatchkeyServer {
  /** Starts listening; resolves with the bound port. */
  listen(port: number, host: string): Promise<number>;
  /**
   * Stops accepting connections, lets in-flight calls finish for up to
   * `graceMs`, then closes whatever is left.
   */
  close(graceMs: number): Promise<void>;
}

const H2_PREFACE = Buffer.from("PRI * HTTP/2.0\r\n");

/**
 * One port for every protocol: gRPC, gRPC-Web and Connect, over HTTP/2 and
 * HTTP/1.1. Without TLS, the first bytes of a connection decide: the HTTP/2
 * preface goes to the HTTP/2 server, anything else to the HTTP/1.1 server. With
 * TLS, ALPN decides the same way. HTTP/2 streams are taken from the `stream`
 * event: unary gRPC calls go to the lean handler (grpc-unary.ts) when it
 * accepts them, every other stream gets Node's compatibility request/response
 * and goes to Connect-Node. Returns an un-started server.
 */
export function createServer(opts: ServerOptions): LatchkeyServer {
  const connect = connectNodeAdapter({ ...opts.connect, routes: opts.routes, interceptors: opts.interceptors });
  const fast = opts.services
    ? createGrpcUnaryHandler(opts.services, opts.interceptors, new Map([[VerifyKeyResponseSchema.typeName, encodeVerifyKeyResponse as ResponseEncoder]]))
    : null;
  const sessions = new Set<http2.Http2Session>();
  const sockets = new Set<net.Socket>();
  // No 'request' listener on this server: it would make Node build compatibility
  // objects for every stream, including those the lean handler serves.
  const h2 = http2.createServer({});
  h2.on("stream", (stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders, _flags: number, rawHeaders: string[]) => {
    if (fast?.(stream, headers)) return;
    connect(new http2.Http2ServerRequest(stream, headers, {}, rawHeaders), new http2.Http2ServerResponse(stream));
  });
  const h1 = http.createServer((req, res) => {
    // HTTP/1.1 sockets with a request in flight; the others are idle and may be
    // closed at shutdown (h1 never listens itself, so Node does not track them).
    busy.add(req.socket);
    res.once("close", () => busy.delete(req.socket));
    // While closing, the socket is closed as soon as this response is done.
    if (closing) res.setHeader("connection", "close");
    connect(req, res);
  });
  const busy = new Set<net.Socket>();
  const h1Sockets = new Set<net.Socket>();
  let closing = false;
  const closeIdleH1 = () => {
    for (const s of h1Sockets) if (!busy.has(s)) s.destroy();
  };
  h1.keepAliveTimeout = 65_000;

  const dispatch = (socket: net.Socket, isH2: boolean) => {
    if (isH2) h2.emit("connection", socket);
    else h1.emit("connection", socket);
  };
  let front: net.Server;
  if (opts.tls) {
    front = tls.createServer(
      { cert: readFileSync(opts.tls.certFile), key: readFileSync(opts.tls.keyFile), ALPNProtocols: ["h2", "http/1.1"] },
      (socket) => {
        sockets.add(socket);
        socket.on("close", () => sockets.delete(socket));
        dispatch(socket, socket.alpnProtocol === "h2");
      },
    );
    front.on("tlsClientError", (_err, socket) => socket.destroy());
  } else {
    front = net.createServer((socket) => {
      let head = Buffer.alloc(0);
      const onData = (chunk: Buffer) => {
        head = Buffer.concat([head, chunk]);
        const n = Math.min(head.length, H2_PREFACE.length);
        const isH2 = head.subarray(0, n).equals(H2_PREFACE.subarray(0, n));
        if (isH2 && head.length < H2_PREFACE.length) return; // need more bytes to be sure
        socket.off("data", onData);
        socket.pause();
        socket.unshift(head);
        dispatch(socket, isH2);
        // The HTTP/2 session reads the unshifted preface on its next tick; resuming
        // here would drop it. HTTP/1.1 needs the socket flowing again.
        if (!isH2) socket.resume();
      };
      socket.on("data", onData);
      socket.on("error", () => socket.destroy());
    });
  }
  front.on("connection", (s: net.Socket) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
  });
  h1.on("connection", (s: net.Socket) => {
    sockets.add(s);
    h1Sockets.add(s);
    s.on("close", () => {
      sockets.delete(s);
      h1Sockets.delete(s);
    });
  });
  h2.on("session", (s) => {
    sessions.add(s);
    s.on("close", () => sessions.delete(s));
  });

  return {
    listen(port, host) {
      return new Promise((resolve, reject) => {
        front.once("error", reject);
        front.listen(port, host, () => {
          front.off("error", reject);
          resolve((front.address() as net.AddressInfo).port);
        });
      });
    },
    async close(graceMs) {
      const closed = new Promise<void>((resolve) => front.close(() => resolve()));
      // GOAWAY: clients stop sending new calls here; open streams run to completion.
      for (const s of sessions) s.close();
      closing = true;
      closeIdleH1();
      const drained = new Promise<void>((resolve) => {
        const tick = setInterval(() => {
          closeIdleH1();
          if (sessions.size === 0 && sockets.size === 0) {
            clearInterval(tick);
            resolve();
          }
        }, 20);
        setTimeout(() => {
          clearInterval(tick);
          resolve();
        }, graceMs).unref();
      });
      await drained;
      for (const s of sessions) s.destroy();
      for (const s of sockets) s.destroy();
      await closed;
    },
  };
}
