import { Code, ConnectError, type ConnectRouter, type Interceptor } from "@connectrpc/connect";
import { connectNodeAdapter, type ConnectNodeAdapterOptions } from "@connectrpc/connect-node";
import { readFileSync } from "node:fs";
import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import tls from "node:tls";
import { VerifyKeyResponseSchema } from "../../gen/latchkey/v1/key_service_pb.js";
import { toConnectError } from "../rpc/interceptors.js";
import { PUBLIC_SERVICES, clientStillSending, refuseHttp1, refuseStream, serviceOf, stopUpload } from "./admission.js";
import { createGrpcUnaryHandler, type LeanCall, type ResponseEncoder, type ServiceRegistration } from "./grpc-unary.js";
import type { Logger } from "../observability/logger.js";
import type { Metrics } from "../observability/metrics.js";
import { encodeVerifyKeyResponse } from "./verify-response-encoder.js";

/** What one client may cost the port; every field is a setting (README, configuration). */
export interface TransportLimits {
  /** Largest message on every protocol, both directions, after decompression. */
  maxMessageBytes: number;
  /** Largest response message, when it must differ from maxMessageBytes (default: the same). */
  maxResponseBytes?: number;
  /** Largest request message to a public service (health, reflection). */
  publicMaxMessageBytes: number;
  /** Most open connections; more are closed on arrival. */
  maxConnections: number;
  /** Most concurrent streams per HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS). */
  maxConcurrentStreams: number;
  /** Largest request header block. */
  maxHeaderBytes: number;
  /** TLS handshake + HTTP/2 preface and SETTINGS, or HTTP/1.1 request headers. */
  headersTimeoutMs: number;
  /** A call's whole request (headers and body). */
  requestTimeoutMs: number;
  /** HTTP/2 connection without open streams; HTTP/1.1 keep-alive between requests. */
  idleTimeoutMs: number;
}

export const DEFAULT_LIMITS: TransportLimits = {
  maxMessageBytes: 4 * 1024 * 1024,
  publicMaxMessageBytes: 64 * 1024,
  maxConnections: 1000,
  maxConcurrentStreams: 100,
  maxHeaderBytes: 16 * 1024,
  headersTimeoutMs: 10_000,
  requestTimeoutMs: 30_000,
  idleTimeoutMs: 65_000,
};

export interface ServerOptions {
  routes: (router: ConnectRouter) => void;
  /** When given, unary gRPC calls to these services take the lean path (grpc-unary.ts). */
  services?: ServiceRegistration[];
  interceptors: Interceptor[];
  tls?: { certFile: string; keyFile: string } | null;
  /**
   * Checks the `authorization` header of every call to a non-public service
   * before any byte of its body is read; a rejection is answered in the
   * call's protocol. Without it every call is admitted (the interceptors still
   * run).
   */
  authenticate?: ((authorization: string | null) => Promise<unknown>) & {
    /** What a root key checked before and still cached comes to, without a promise; undefined when it must be checked. */
    cached?: (authorization: string | null) => unknown;
  };
  /** Services that need no root key (default: health and reflection). */
  publicServices?: ReadonlySet<string>;
  limits?: Partial<TransportLimits>;
  logger?: Logger;
  /** Refusals at the front door are counted here (the interceptors never see those calls). */
  metrics?: Metrics;
  /**
   * Per request path, a check run before a call is admitted; an error refuses
   * the call at the door (the health Watch bound: a flood of watchers costs no
   * Connect-Node streaming machinery).
   */
  gates?: ReadonlyMap<string, () => ConnectError | undefined>;
  /** Connect-Node's JSON options (e.g. the strict text decoder, a type registry for google.protobuf.Any). */
  jsonOptions?: ConnectNodeAdapterOptions["jsonOptions"];
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
const { NGHTTP2_CANCEL } = http2.constants;
const noop = () => undefined;

/** Open streams of an HTTP/2 session, kept on the session itself. */
const OPEN_STREAMS = Symbol("open streams");
/** Since when (the sweep's clock) a session has had no open stream. */
const IDLE_SINCE = Symbol("idle since");
type Session = http2.ServerHttp2Session & { [OPEN_STREAMS]?: number; [IDLE_SINCE]?: number } & Proven;
/** The TCP socket under a connection (the same socket without TLS). */
const RAW = Symbol("raw socket");
type Proven = { [RAW]?: net.Socket };
/** The session of a stream: Node clears `stream.session` before the stream's 'close'. */
const SESSION = Symbol("session");
type Stream = http2.ServerHttp2Stream & { [SESSION]?: Session };

/**
 * How long a connection closed after an early answer stays half-closed (our FIN
 * sent, its unread bytes not read) before it is destroyed: closing a socket with
 * unread bytes sends RST, which can cost a client the answer it has not read yet.
 * Go's net/http waits the same 500 ms for the same reason.
 */
const LINGER_MS = 500;

/** socket.destroySoon for a connection closed after an early answer: FIN now, destroyed after LINGER_MS or once the client closes. */
function lingeringClose(this: net.Socket): void {
  if (this.writable) this.end();
  if (this.destroyed) return;
  const timer = setTimeout(() => this.destroy(), LINGER_MS);
  timer.unref();
  this.once("close", () => clearTimeout(timer));
}

/**
 * The HTTP/1.1 response. An answer written before its request was read whole —
 * a message over the limit, an error in the middle of a client stream, a
 * refusal at the door — leaves the rest of that request unread: Connect-Node
 * has started reading it (so Node does not discard it on its own) and stops,
 * the request stays paused and the parser stops reading the socket. On a
 * keep-alive connection the client's next request would then wait behind it
 * until the request timeout answered it 408. Such an answer says `Connection:
 * close` instead, and the connection is closed after it (lingeringClose).
 */
class Http1Response extends http.ServerResponse {
  override writeHead(...args: unknown[]): this {
    if (!this.req.complete) {
      this.shouldKeepAlive = false;
      // Node ends a connection after a `Connection: close` answer with destroySoon.
      if (this.socket) this.socket.destroySoon = lingeringClose;
    }
    return (super.writeHead as (...a: unknown[]) => this)(...args);
  }
}

/*
 * `shouldKeepAlive` reads false while the request is still arriving. Connect-Node
 * 2.3 answers early on a keep-alive connection only after draining up to 256 KiB
 * of the unread body (its own fix for the stuck connection above), so an answer
 * to a request whose body never ends — a client stream with a message over the
 * limit, still open — waited for the request timeout and became a 408. Reading
 * false, Connect-Node answers at once and writeHead above closes the connection.
 * Node itself sets the flag (from the request's Connection header) and reads it
 * when the answer is written, so it stays an ordinary flag underneath; an
 * accessor on the prototype, since @types/node declares it as a field.
 */
const KEEP_ALIVE = Symbol("keep-alive");
Object.defineProperty(Http1Response.prototype, "shouldKeepAlive", {
  get(this: Http1Response & { [KEEP_ALIVE]?: boolean }): boolean {
    return (this[KEEP_ALIVE] ?? false) && this.req.complete;
  },
  set(this: Http1Response & { [KEEP_ALIVE]?: boolean }, value: boolean) {
    this[KEEP_ALIVE] = value;
  },
  configurable: true,
});

/**
 * One port for every protocol: gRPC, gRPC-Web and Connect, over HTTP/2 and
 * HTTP/1.1. Without TLS, the first bytes of a connection decide: the HTTP/2
 * preface goes to the HTTP/2 server, anything else to the HTTP/1.1 server. With
 * TLS, ALPN decides the same way. HTTP/2 streams are taken from the `stream`
 * event: unary gRPC calls go to the lean handler (grpc-unary.ts) when it
 * accepts them, every other stream gets Node's compatibility request/response
 * and goes to Connect-Node.
 *
 * Before a call's body is read, its root key is checked from its headers
 * (`authenticate`), and every socket, session and stream is bounded by
 * `limits`: the README's "front door" section explains each bound. Returns an
 * un-started server.
 */
export function createServer(opts: ServerOptions): LatchkeyServer {
  const given: TransportLimits = { ...DEFAULT_LIMITS, ...opts.limits };
  // A public service never takes more than any other.
  const limits: TransportLimits = { ...given, publicMaxMessageBytes: Math.min(given.publicMaxMessageBytes, given.maxMessageBytes) };
  const writeMax = limits.maxResponseBytes ?? limits.maxMessageBytes;
  const publicServices = opts.publicServices ?? PUBLIC_SERVICES;
  const authenticate = opts.authenticate;
  const gates = opts.gates;
  const logger = opts.logger;

  // Two Connect handlers over the same routes: public services read far smaller messages.
  const connect = connectNodeAdapter({
    routes: opts.routes,
    interceptors: opts.interceptors,
    jsonOptions: opts.jsonOptions,
    readMaxBytes: limits.maxMessageBytes,
    writeMaxBytes: writeMax,
  });
  const connectPublic = connectNodeAdapter({
    routes: opts.routes,
    interceptors: opts.interceptors,
    jsonOptions: opts.jsonOptions,
    readMaxBytes: limits.publicMaxMessageBytes,
    writeMaxBytes: writeMax,
  });
  const lean = opts.services
    ? createGrpcUnaryHandler(
        opts.services,
        opts.interceptors,
        new Map([[VerifyKeyResponseSchema.typeName, encodeVerifyKeyResponse as ResponseEncoder]]),
        { writeMaxBytes: writeMax },
      )
    : null;

  // Method labels for refused calls: only methods served here, so a client cannot grow the label set.
  const known = new Set((opts.services ?? []).flatMap((r) => r.service.methods.map((m) => `/${r.service.typeName}/${m.name}`)));
  const rejected = (err: unknown, path: string | undefined): ConnectError => {
    const { error, internal } = toConnectError(err);
    if (internal) logger?.error({ err }, "root key check failed");
    const p = path?.split("?", 1)[0] ?? "";
    opts.metrics?.rpcRequests.inc({ method: known.has(p) ? p.slice(1) : "unknown", code: Code[error.code] });
    return error;
  };

  // ---------------------------------------------------------------------------
  // Requests still arriving: a request (headers and body) must be complete
  // within requestTimeoutMs. One coarse sweep for all streams instead of a
  // timer per call: an entry costs a Map insertion and deletion.
  const arriving = new Map<http2.ServerHttp2Stream, number>();
  // The same sweep closes idle HTTP/2 sessions: no open stream for idleTimeoutMs
  // (as grpc-go's MaxConnectionIdle counts it). Node's own session timeout would
  // do it with a timer refreshed on every frame and write, several per call.
  const sweepEvery = Math.max(10, Math.min(1000, Math.floor(limits.requestTimeoutMs / 4), Math.floor(limits.idleTimeoutMs / 4)));
  let clock = 0;
  const sessions = new Set<Session>();
  const sweeper = setInterval(() => {
    clock += sweepEvery;
    for (const [stream, since] of arriving) {
      if (clock - since < limits.requestTimeoutMs) continue;
      arriving.delete(stream);
      if (clientStillSending(stream) && !stream.closed) stream.close(NGHTTP2_CANCEL);
    }
    for (const session of sessions) {
      if (session[OPEN_STREAMS] === 0 && clock - (session[IDLE_SINCE] ?? clock) >= limits.idleTimeoutMs && !session.closed && !session.destroyed) session.close();
    }
  }, sweepEvery);
  sweeper.unref();

  // ---------------------------------------------------------------------------
  // HTTP/2.

  const h2 = http2.createServer({
    settings: { maxConcurrentStreams: limits.maxConcurrentStreams, maxHeaderListSize: limits.maxHeaderBytes, enablePush: false },
  });
  // No 'request' listener on this server: it would make Node build compatibility
  // objects for every stream, including those the lean handler serves.
  h2.on("stream", onStream);
  h2.on("sessionError", noop);
  h2.on("session", (session: Session) => {
    session[OPEN_STREAMS] = 0;
    session[IDLE_SINCE] = clock;
    session[RAW] = dispatching;
    sessions.add(session);
    session.on("error", noop);
    // The client's SETTINGS must follow the preface within headersTimeoutMs.
    const handshake = setTimeout(() => session.destroy(), limits.headersTimeoutMs);
    handshake.unref();
    session.once("remoteSettings", () => clearTimeout(handshake));
    session.once("close", () => {
      clearTimeout(handshake);
      sessions.delete(session);
    });
  });

  function onStreamClose(this: Stream) {
    arriving.delete(this);
    const session = this[SESSION];
    if (session && session[OPEN_STREAMS] && --session[OPEN_STREAMS] === 0) session[IDLE_SINCE] = clock;
  }

  function onStream(stream: Stream, headers: http2.IncomingHttpHeaders, _flags: number, rawHeaders: string[]) {
    // Errors of one stream (a reset, a lost connection) end that stream only.
    stream.on("error", noop);
    stream.on("close", onStreamClose);
    const session = stream.session as Session | undefined;
    if (session) {
      stream[SESSION] = session;
      session[OPEN_STREAMS] = (session[OPEN_STREAMS] ?? 0) + 1;
      if (session[RAW]) {
        fresh.delete(session[RAW]);
        session[RAW] = undefined;
      }
    }
    arriving.set(stream, clock);
    const gate = gates?.get(headers[":path"] ?? "");
    const refusal = gate?.();
    if (refusal) return refuseStream(stream, headers, rejected(refusal, headers[":path"]));
    const isPublic = publicServices.has(serviceOf(headers[":path"]));
    let call: LeanCall | null;
    try {
      call = lean?.(stream, headers) ?? null;
    } catch (err) {
      logger?.error({ err }, "lean gRPC path failed");
      return refuseStream(stream, headers, new ConnectError("internal error", Code.Internal));
    }
    if (isPublic || !authenticate) return admit(stream, headers, rawHeaders, call, isPublic);
    const auth = typeof headers.authorization === "string" ? headers.authorization : null;
    if (authenticate.cached?.(auth) !== undefined) return admit(stream, headers, rawHeaders, call, false);
    authenticate(auth).then(
      () => admit(stream, headers, rawHeaders, call, false),
      (err) => {
        const e = rejected(err, headers[":path"]);
        if (call) call.refuse(e);
        else refuseStream(stream, headers, e);
      },
    );
  }

  /**
   * Connect-Node answered (e.g. a message over the limit) while the client is
   * still sending: ask the client to stop instead of leaving the stream to the
   * request timeout.
   */
  function onConnectFinish(this: http2.ServerHttp2Stream) {
    if (clientStillSending(this)) stopUpload(this);
  }

  function admit(stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders, rawHeaders: string[], call: LeanCall | null, isPublic: boolean) {
    if (stream.destroyed || stream.closed) return;
    if (call) return call.start(isPublic ? limits.publicMaxMessageBytes : limits.maxMessageBytes);
    stream.once("finish", onConnectFinish);
    try {
      const req = new http2.Http2ServerRequest(stream, headers, {}, rawHeaders);
      // Node ends an empty request body on its own, without a reader; if that
      // happened while the root key was checked, end the request as Node's compat layer would.
      if (stream.readableEnded) req.push(null);
      (isPublic ? connectPublic : connect)(req, new http2.Http2ServerResponse(stream));
    } catch (err) {
      // e.g. a request without :authority, which Connect-Node cannot build a URL for.
      refuseStream(stream, headers, new ConnectError(`cannot serve this request: ${(err as Error).message}`, Code.InvalidArgument));
    }
  }

  // ---------------------------------------------------------------------------
  // HTTP/1.1.

  const h1 = http.createServer(
    {
      ServerResponse: Http1Response,
      maxHeaderSize: limits.maxHeaderBytes,
      headersTimeout: limits.headersTimeoutMs,
      requestTimeout: limits.requestTimeoutMs,
      keepAliveTimeout: limits.idleTimeoutMs,
      connectionsCheckingInterval: Math.max(10, Math.min(1000, Math.floor(limits.headersTimeoutMs / 4))),
    },
    (req, res) => onRequest(req, res, false),
  );
  // Expect: 100-continue is answered only once the root key is good, so a refused client never sends its body.
  h1.on("checkContinue", (req: http.IncomingMessage, res: http.ServerResponse) => onRequest(req, res, true));
  // h1 never listens itself (the front server hands it sockets), and Node starts
  // the checks behind headersTimeout and requestTimeout on 'listening'.
  h1.emit("listening");
  const busy = new Set<net.Socket>();
  const h1Sockets = new Set<net.Socket>();
  let closing = false;
  const closeIdleH1 = () => {
    for (const s of h1Sockets) if (!busy.has(s)) s.destroy();
  };

  function onRequest(req: http.IncomingMessage, res: http.ServerResponse, expectsContinue: boolean) {
    // HTTP/1.1 sockets with a request in flight; the others are idle and may be
    // closed at shutdown.
    busy.add(req.socket);
    res.once("close", () => busy.delete(req.socket));
    fresh.delete((req.socket as net.Socket & Proven)[RAW] ?? req.socket);
    // While closing, the socket is closed as soon as this response is done.
    if (closing) res.setHeader("connection", "close");
    const refusal = gates?.get(req.url?.split("?", 1)[0] ?? "")?.();
    if (refusal) return refuseHttp1(req, res, rejected(refusal, req.url));
    const isPublic = publicServices.has(serviceOf(req.url));
    if (isPublic || !authenticate) return admit1(req, res, isPublic, expectsContinue);
    const auth = req.headers.authorization;
    authenticate(auth ?? null).then(
      () => admit1(req, res, false, expectsContinue),
      (err) => refuseHttp1(req, res, rejected(err, req.url)),
    );
  }

  function admit1(req: http.IncomingMessage, res: http.ServerResponse, isPublic: boolean, expectsContinue: boolean) {
    if (res.destroyed) return;
    try {
      if (expectsContinue) res.writeContinue();
      (isPublic ? connectPublic : connect)(req, res);
    } catch (err) {
      refuseHttp1(req, res, new ConnectError(`cannot serve this request: ${(err as Error).message}`, Code.InvalidArgument));
    }
  }

  // ---------------------------------------------------------------------------
  // The port: connection cap, protocol choice, headers timeout until then.

  const sockets = new Set<net.Socket>();
  // The cap on connections. Past it, the oldest connection that has not made a
  // request yet is closed to make room — the new one itself if every other has
  // made one — so connections that never speak cannot lock real clients out,
  // and a connection that made a request is never closed for a newcomer.
  const open = new Set<net.Socket>();
  const fresh = new Set<net.Socket>(); // raw sockets without a request yet, oldest first
  /** TLS only: a raw socket by its remote address until its handshake is done. */
  const handshaking = new Map<string, net.Socket>();
  const remoteKey = (s: net.Socket) => `${s.remoteAddress}:${s.remotePort}`;
  let dispatching: net.Socket | undefined;
  const sniffTimeout = function (this: net.Socket) {
    this.destroy();
  };
  const dispatch = (socket: net.Socket & Proven, raw: net.Socket | undefined, isH2: boolean) => {
    // From here on the protocol's own timeouts apply.
    socket.setTimeout(0);
    socket.off("timeout", sniffTimeout);
    socket[RAW] = raw;
    // Node creates the HTTP/2 session (and emits 'session') within this emit.
    dispatching = raw;
    if (isH2) h2.emit("connection", socket);
    else h1.emit("connection", socket);
    dispatching = undefined;
  };
  let front: net.Server;
  if (opts.tls) {
    front = tls.createServer(
      {
        cert: readFileSync(opts.tls.certFile),
        key: readFileSync(opts.tls.keyFile),
        ALPNProtocols: ["h2", "http/1.1"],
        handshakeTimeout: limits.headersTimeoutMs,
      },
      (socket) => {
        sockets.add(socket);
        socket.on("close", () => sockets.delete(socket));
        const key = remoteKey(socket);
        const raw = handshaking.get(key);
        handshaking.delete(key);
        dispatch(socket, raw, socket.alpnProtocol === "h2");
      },
    );
    front.on("tlsClientError", (_err, socket) => socket.destroy());
  } else {
    front = net.createServer((socket) => {
      let head: Buffer = Buffer.alloc(0);
      const onData = (chunk: Buffer) => {
        head = head.length === 0 ? chunk : Buffer.concat([head, chunk]);
        const n = Math.min(head.length, H2_PREFACE.length);
        const isH2 = head.subarray(0, n).equals(H2_PREFACE.subarray(0, n));
        if (isH2 && head.length < H2_PREFACE.length) return; // need more bytes to be sure
        socket.off("data", onData);
        socket.pause();
        socket.unshift(head);
        dispatch(socket, socket, isH2);
        // The HTTP/2 session reads the unshifted preface on its next tick; resuming
        // here would drop it. HTTP/1.1 needs the socket flowing again.
        if (!isH2) socket.resume();
      };
      socket.on("data", onData);
      // A connection that does not say which protocol it speaks in time is closed.
      socket.setTimeout(limits.headersTimeoutMs);
      socket.on("timeout", sniffTimeout);
    });
  }
  front.on("connection", (s: net.Socket) => {
    sockets.add(s);
    open.add(s);
    fresh.add(s);
    const key = opts.tls ? remoteKey(s) : "";
    if (opts.tls) handshaking.set(key, s);
    s.on("error", noop);
    s.on("close", () => {
      sockets.delete(s);
      open.delete(s);
      fresh.delete(s);
      if (opts.tls && handshaking.get(key) === s) handshaking.delete(key);
    });
    if (open.size > limits.maxConnections) fresh.values().next().value!.destroy();
  });
  h1.on("connection", (s: net.Socket) => {
    h1Sockets.add(s);
    s.on("close", () => h1Sockets.delete(s));
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
      clearInterval(sweeper);
      h1.close();
      await closed;
    },
  };
}
