import { create, fromBinary, isMessage, toBinary, type DescMessage, type DescMethod, type DescService } from "@bufbuild/protobuf";
import {
  Code,
  ConnectError,
  createServiceImplSpec,
  type ContextKey,
  type ContextValues,
  type HandlerContext,
  type Interceptor,
  type ServiceImpl,
  type UnaryRequest,
  type UnaryResponse,
} from "@connectrpc/connect";
import http2 from "node:http2";
import { performance } from "node:perf_hooks";
import type { LazyCallSignal } from "../domain/verify.js";
import { callSignalKey } from "../rpc/context.js";
import { parseGrpcTimeout } from "../rpc/grpc-timeout.js";
import { clientStillSending, grpcStatusHeaders, stopUpload, tooLarge } from "./admission.js";

/*
 * A lean transport for unary gRPC calls over HTTP/2. Connect-Node serves every
 * protocol through a universal request/response layer (web Headers, async
 * iterables, a linked AbortController and a DOMException per call); profiled
 * under load that layer cost several times the handler itself. Unary gRPC —
 * what backends call VerifyKey with — takes this path instead. It runs the SAME
 * service implementations and the SAME interceptors as the Connect router;
 * only the wire handling differs. Anything it does not handle (streaming,
 * compression, gRPC-Web, Connect, JSON, an invalid grpc-timeout) falls through
 * to Connect-Node unchanged. See docs/performance.md.
 *
 * Deadlines and cancellation behave as in Connect-Node and grpc-js: ctx.signal
 * aborts with DEADLINE_EXCEEDED when grpc-timeout passes (the call is answered
 * DEADLINE_EXCEEDED at that moment and a late result is dropped; a deadline
 * already passed when the request is complete never runs the handler), and
 * with CANCELED when the client resets the stream or the connection goes. Once
 * a call is answered or abandoned nothing more is written to its stream, and
 * nothing here throws out of a stream event.
 */

export interface ServiceRegistration {
  service: DescService;
  impl: Partial<ServiceImpl<DescService>>;
}

/**
 * A hand-written encoder for a response type, taking the handler's
 * (init-shaped) result; it leaves the first `reserve` bytes of what it returns
 * for the caller (the gRPC frame prefix, so the message is not copied again).
 */
export type ResponseEncoder = (message: object, reserve: number) => Uint8Array;

interface Method {
  /** The message framed: 5 bytes for the prefix, then the message. */
  encode: (message: object) => Uint8Array;
  service: DescService;
  input: DescMessage;
  methodDesc: DescMethod;
  run: (req: UnaryRequest) => Promise<UnaryResponse>;
}

/** A unary call the lean path took: `start()` once its request may be read, or `refuse()` it. */
export interface LeanCall {
  start(readMaxBytes: number): void;
  refuse(err: ConnectError): void;
}

export interface GrpcUnaryOptions {
  /** Largest response message; a larger one is answered RESOURCE_EXHAUSTED. */
  writeMaxBytes: number;
}

/**
 * What a call may hold before its root key is checked: the request is read as it
 * arrives (a listener attached later makes Node buffer and re-read the stream,
 * which profiled at several µs a call), but past this much the stream is paused
 * and flow control stops the client — the same bound as Node's own buffer.
 */
const PRE_ADMISSION_BYTES = 16 * 1024;

/**
 * The reason ctx.signal aborts with once a call is answered: Connect-Node
 * aborts it without one, which makes Node build a DOMException (and capture a
 * stack) per call — the largest single item of the lean path's profile. The
 * same kind of error, made once.
 */
const CALL_OVER = new DOMException("This operation was aborted", "AbortError");

/** grpc-timeout: at most 8 digits and a unit; null when invalid. */
function parseTimeout(v: string | undefined): number | undefined | null {
  return v === undefined ? undefined : parseGrpcTimeout(v);
}

function hasEntries(h: Headers): boolean {
  for (const _ of h.keys()) return true;
  return false;
}

/**
 * The request's headers as a `Headers`, filled from Node's header object only
 * when something other than `get` is asked of them: the interceptors read two
 * headers per call, and filling a `Headers` (a validated append per header)
 * was ~2–3 % of a cached VerifyKey's main thread (docs/performance.md). `get` of
 * a header name reads Node's object directly and answers as `Headers.get` would
 * (a repeated header's values joined with ", "; pseudo-headers are not headers).
 */
class RequestHeaders extends Headers {
  private raw: http2.IncomingHttpHeaders | null;

  constructor(raw: http2.IncomingHttpHeaders) {
    super();
    this.raw = raw;
  }

  /** Copies Node's headers in, once; from then on this is a plain Headers. */
  private fill(): void {
    const raw = this.raw;
    if (raw === null) return;
    this.raw = null;
    for (const k in raw) {
      if (k.charCodeAt(0) === 58 /* ":" */) continue;
      const v = raw[k];
      if (v === undefined) continue;
      if (Array.isArray(v)) for (const x of v) super.append(k, x);
      else super.append(k, v);
    }
  }

  override get(name: string): string | null {
    if (this.raw === null) return super.get(name);
    const k = name.toLowerCase();
    if (k.charCodeAt(0) === 58) return super.get(name); // not a valid header name: as Headers answers it
    const v = this.raw[k];
    return v === undefined ? null : Array.isArray(v) ? v.join(", ") : String(v);
  }
  override has(name: string): boolean {
    this.fill();
    return super.has(name);
  }
  override set(name: string, value: string): void {
    this.fill();
    super.set(name, value);
  }
  override append(name: string, value: string): void {
    this.fill();
    super.append(name, value);
  }
  override delete(name: string): void {
    this.fill();
    super.delete(name);
  }
  override getSetCookie(): string[] {
    this.fill();
    return super.getSetCookie();
  }
  override forEach(cb: (value: string, key: string, parent: Headers) => void, thisArg?: unknown): void {
    this.fill();
    super.forEach(cb, thisArg);
  }
  override keys(): HeadersIterator<string> {
    this.fill();
    return super.keys();
  }
  override values(): HeadersIterator<string> {
    this.fill();
    return super.values();
  }
  override entries(): HeadersIterator<[string, string]> {
    this.fill();
    return super.entries();
  }
  override [Symbol.iterator](): HeadersIterator<[string, string]> {
    this.fill();
    return super[Symbol.iterator]();
  }
}

/**
 * Returns a function that takes unary gRPC calls of the given services off
 * their streams (returning a LeanCall) and returns null for any request it
 * leaves to Connect-Node.
 */
export function createGrpcUnaryHandler(
  services: ServiceRegistration[],
  interceptors: Interceptor[],
  /** By response type name. Results of such methods reach interceptors as returned (init shape). */
  encoders: Map<string, ResponseEncoder>,
  options: GrpcUnaryOptions,
) {
  const methods = new Map<string, Method>();
  for (const { service, impl } of services) {
    const spec = createServiceImplSpec(service, impl as ServiceImpl<DescService>);
    for (const m of service.methods) {
      if (m.methodKind !== "unary") continue;
      const s = spec.methods[m.localName];
      if (s.kind !== "unary") continue;
      const custom = encoders.get(m.output.typeName);
      const base = async (req: UnaryRequest): Promise<UnaryResponse> => {
        // The context is per call: take over what interceptors may have replaced.
        const call = (req as unknown as { call: UnaryCall }).call;
        // The last moment to notice a deadline that passed before the timer could fire.
        call.checkDeadline();
        const ctx = call.ctx!;
        ctx.requestHeader = req.header;
        ctx.values = req.contextValues;
        const out = await s.impl(req.message as never, ctx as unknown as HandlerContext);
        return call.response(custom || isMessage(out, m.output) ? out : create(m.output, out as never));
      };
      const run = interceptors.reduceRight<(r: UnaryRequest) => Promise<UnaryResponse>>((next, i) => i(next as never) as never, base);
      const encode: (message: object) => Uint8Array = custom
        ? (msg) => custom(msg, 5)
        : (msg) => {
            const bytes = toBinary(m.output, msg as never);
            const out = new Uint8Array(5 + bytes.length);
            out.set(bytes, 5);
            return out;
          };
      methods.set(`/${service.typeName}/${m.name}`, { encode, service, input: m.input, methodDesc: m, run });
    }
  }

  return function take(stream: http2.ServerHttp2Stream, h: http2.IncomingHttpHeaders): LeanCall | null {
    const ct = h["content-type"];
    if (ct !== "application/grpc" && ct !== "application/grpc+proto") return null;
    const enc = h["grpc-encoding"];
    if (enc !== undefined && enc !== "identity") return null;
    const method = methods.get(h[":path"] ?? "");
    if (!method || h[":method"] !== "POST") return null;
    // An invalid grpc-timeout goes to Connect-Node, which answers it INVALID_ARGUMENT.
    const timeoutMs = parseTimeout(h["grpc-timeout"] as string | undefined);
    if (timeoutMs === null) return null;
    return new UnaryCall(stream, h, method, ct, timeoutMs, options.writeMaxBytes);
  };
}

/** The per-call state is kept on the stream, so the stream listeners below are shared, not allocated per call. */
const CALL = Symbol("lean gRPC call");
type CallStream = http2.ServerHttp2Stream & { [CALL]?: UnaryCall };

function onData(this: CallStream, chunk: Buffer) {
  this[CALL]!.data(chunk);
}
function onEnd(this: CallStream) {
  this[CALL]!.end();
}
function onClose(this: CallStream) {
  this[CALL]!.closed();
}
function onWantTrailers(this: CallStream) {
  this[CALL]!.sendTrailers();
}
function onDeadline(call: UnaryCall) {
  call.expire();
}

/*
 * Deadlines. A short one gets a timer of its own (it must fire on time: 0.5 ms
 * deadlines are real). A long one — clients such as ghz send 20 s on every call
 * that answers in a millisecond — joins a set that one shared timer looks at
 * every LONG_TICK_MS: joining and leaving it costs a Set insertion and deletion,
 * not a timer, and it fires at most LONG_TICK_MS late (≤ 5 %).
 */
const SHORT_DEADLINE_MS = 1000;
const LONG_TICK_MS = 50;
const longDeadlines = new Set<UnaryCall>();
let longTimer: NodeJS.Timeout | undefined;
function sweepLongDeadlines() {
  if (longDeadlines.size === 0) {
    clearInterval(longTimer);
    longTimer = undefined;
    return;
  }
  const now = performance.now();
  for (const call of longDeadlines) if (call.deadlineAt() <= now) call.expire();
}

/** Mutable view of the handler context the lean path builds. */
interface LeanContext {
  requestHeader: Headers;
  values: ContextValues;
}

/**
 * Context values as Connect's createContextValues keeps them (on the object,
 * under each key's symbol), with the methods on a prototype: the object literal
 * it returns makes three functions per call.
 */
class CallValues implements ContextValues {
  get<T>(key: ContextKey<T>): T {
    return key.id in this ? ((this as unknown as Record<symbol, T>)[key.id]) : key.defaultValue;
  }
  set<T>(key: ContextKey<T>, value: T): this {
    (this as unknown as Record<symbol, T>)[key.id] = value;
    return this;
  }
  delete(key: ContextKey<unknown>): this {
    delete (this as unknown as Record<symbol, unknown>)[key.id];
    return this;
  }
}

/** What Connect's UnaryRequest and UnaryResponse share: a unary call of one method. */
class LeanMessage {
  readonly stream = false;
  readonly service: DescService;
  readonly method: DescMethod;
  constructor(m: Method) {
    this.service = m.service;
    this.method = m.methodDesc;
  }
}

/** The handler's result as interceptors see it (Connect's UnaryResponse); headers and trailers are allocated only if read. */
class LeanResponse extends LeanMessage {
  constructor(
    private readonly call: UnaryCall,
    m: Method,
    readonly message: unknown,
  ) {
    super(m);
  }
  get header(): Headers {
    return this.call.responseHeader();
  }
  get trailer(): Headers {
    return this.call.responseTrailer();
  }
}

/** The request interceptors see (Connect's UnaryRequest), with its lazy url and signal on a prototype. */
class LeanRequest extends LeanMessage {
  readonly requestMethod = "POST";
  constructor(
    readonly call: UnaryCall,
    m: Method,
    readonly header: Headers,
    readonly contextValues: ContextValues,
    readonly message: unknown,
  ) {
    super(m);
  }
  get url(): string {
    return this.call.getUrl();
  }
  get signal(): AbortSignal {
    return this.call.signal();
  }
}

/**
 * The handler context of a lean call. A class, not an object literal: a literal
 * with getters builds its accessors and closures anew for every call.
 */
class LeanHandlerContext implements LeanContext {
  readonly method: DescMethod;
  readonly service: DescService;
  readonly protocolName = "grpc";
  readonly requestMethod = "POST";

  constructor(
    private readonly call: UnaryCall,
    m: Method,
    public requestHeader: Headers,
    public values: ContextValues,
  ) {
    this.method = m.methodDesc;
    this.service = m.service;
  }

  get url(): string {
    return this.call.getUrl();
  }

  get signal(): AbortSignal {
    return this.call.toAbortSignal();
  }

  timeoutMs(): number | undefined {
    return this.call.timeLeft();
  }

  get responseHeader(): Headers {
    return this.call.responseHeader();
  }

  get responseTrailer(): Headers {
    return this.call.responseTrailer();
  }
}

class UnaryCall implements LeanCall, LazyCallSignal {
  private chunks: Buffer[] = [];
  private size = 0;
  /** Message length from the 5-byte prefix, once read; -1 before. */
  private announced = -1;
  private readMaxBytes = 0;
  /** The root key was checked (or none is needed): the request may be read whole and run. */
  private admitted = false;
  /** The request ended before the call was admitted. */
  private ended = false;
  /** performance.now() at which the deadline passes; 0 without a deadline. */
  private deadline = 0;
  private timer: NodeJS.Timeout | undefined;
  private controller: AbortController | undefined;
  /** The call has ended (answered, failed, expired or cancelled); ctx.signal aborts with `reason`. */
  aborted = false;
  reason: ConnectError | DOMException | undefined;
  /** Answered (or abandoned): nothing more is written, a late result is dropped. */
  private done = false;
  private header: Headers | undefined;
  private trailer: Headers | undefined;
  private url: string | undefined;
  private baseResponse: UnaryResponse | undefined;
  private trailers: http2.OutgoingHttpHeaders | undefined;
  ctx: LeanContext | undefined;

  constructor(
    private readonly stream: CallStream,
    private readonly raw: http2.IncomingHttpHeaders,
    private readonly method: Method,
    private readonly ct: string,
    timeoutMs: number | undefined,
    private readonly writeMaxBytes: number,
  ) {
    stream[CALL] = this;
    // 'close', 'end' and 'wantTrailers' come once: `on` spares the wrapper `once` allocates.
    stream.on("close", onClose);
    stream.on("data", onData);
    stream.on("end", onEnd);
    if (timeoutMs !== undefined) {
      this.deadline = performance.now() + timeoutMs;
      if (timeoutMs <= 0) this.expire();
      else if (timeoutMs <= SHORT_DEADLINE_MS) this.timer = setTimeout(onDeadline, Math.ceil(timeoutMs), this);
      else {
        longDeadlines.add(this);
        if (!longTimer) (longTimer = setInterval(sweepLongDeadlines, LONG_TICK_MS)).unref();
      }
    }
  }

  start(readMaxBytes: number): void {
    if (this.done) return;
    this.admitted = true;
    this.readMaxBytes = readMaxBytes;
    if (!this.check()) return;
    if (this.ended) return this.end();
    if (this.stream.isPaused()) this.stream.resume();
  }

  refuse(err: ConnectError): void {
    this.fail(err);
  }

  data(chunk: Buffer): void {
    if (this.done) return;
    this.size += chunk.length;
    this.chunks.push(chunk);
    // Until the root key is checked nothing is judged (an unauthenticated call is
    // UNAUTHENTICATED whatever it sends), and little is held.
    if (!this.admitted) {
      if (this.size >= PRE_ADMISSION_BYTES) this.stream.pause();
      return;
    }
    this.check();
  }

  /** Checks what arrived so far; false when the call was refused for it. */
  private check(): boolean {
    if (this.announced < 0) {
      if (this.size < 5) return true;
      const head = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks, this.size);
      if (head[0] !== 0) {
        this.fail(new ConnectError("received a compressed message without grpc-encoding", Code.Internal));
        return false;
      }
      this.announced = head.readUInt32BE(1);
      // Refused from the prefix, before the message is read.
      if (this.announced > this.readMaxBytes) {
        this.fail(tooLarge("message", this.announced, this.readMaxBytes));
        return false;
      }
    }
    if (this.size > 5 + this.announced) {
      this.fail(new ConnectError("protocol error: received extra input message for unary method", Code.Unimplemented));
      return false;
    }
    return true;
  }

  end(): void {
    if (this.done) return;
    if (!this.admitted) {
      this.ended = true;
      return;
    }
    // A reset or a lost connection also ends the readable side: that is a cancellation, not a request.
    if (this.stream.closed || this.stream.destroyed) return this.closed();
    if (this.size === 0) return this.fail(new ConnectError("protocol error: missing input message for unary method", Code.Unimplemented));
    if (this.size !== 5 + this.announced) return this.fail(new ConnectError("protocol error: incomplete envelope", Code.InvalidArgument));
    if (this.deadline !== 0 && performance.now() >= this.deadline) return this.expire();
    const body = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks, this.size);
    this.chunks = [];
    let message;
    try {
      message = fromBinary(this.method.input, body.subarray(5));
    } catch (err) {
      return this.fail(new ConnectError(`parse binary: ${(err as Error).message}`, Code.Internal));
    }
    this.run(message);
  }

  private run(message: unknown): void {
    const method = this.method;
    const header = new RequestHeaders(this.raw);
    const values = new CallValues();
    values.set(callSignalKey, this);
    this.ctx = new LeanHandlerContext(this, method, header, values);
    const req = new LeanRequest(this, method, header, values, message) as unknown as UnaryRequest;
    let pending: Promise<UnaryResponse>;
    try {
      pending = method.run(req);
    } catch (err) {
      pending = Promise.reject(err);
    }
    pending.then(
      (res) => this.respond(res),
      (err) => this.fail(err instanceof ConnectError ? err : new ConnectError("internal error", Code.Internal)),
    );
  }

  /** The handler's result as interceptors see it; headers and trailers are allocated only if read. */
  response(message: unknown): UnaryResponse {
    return (this.baseResponse = new LeanResponse(this, this.method, message) as unknown as UnaryResponse);
  }

  /** The response headers, allocated on first use (by a handler, an interceptor or respond). */
  responseHeader(): Headers {
    return (this.header ??= new Headers());
  }

  responseTrailer(): Headers {
    return (this.trailer ??= new Headers());
  }

  /** ctx.timeoutMs(). */
  timeLeft(): number | undefined {
    return this.deadline === 0 ? undefined : this.deadline - performance.now();
  }

  getUrl(): string {
    return (this.url ??= `http://${this.raw[":authority"] ?? "localhost"}${this.raw[":path"]}`);
  }

  /** As AbortSignal.throwIfAborted (LazyCallSignal: a verification asks this, not ctx.signal). */
  throwIfAborted(): void {
    if (this.aborted) throw this.reason;
  }

  toAbortSignal(): AbortSignal {
    return this.signal();
  }

  /** ctx.signal: allocated on first read only. */
  signal(): AbortSignal {
    if (!this.controller) {
      this.controller = new AbortController();
      if (this.aborted) this.controller.abort(this.reason);
    }
    return this.controller.signal;
  }

  private abort(reason: ConnectError | DOMException): void {
    if (this.aborted) return;
    this.aborted = true;
    this.reason = reason;
    this.controller?.abort(reason);
  }

  deadlineAt(): number {
    return this.deadline;
  }

  /** Nothing more will be written: stop watching the deadline. */
  private finish(): void {
    this.done = true;
    this.chunks = [];
    if (this.timer !== undefined) clearTimeout(this.timer);
    else if (this.deadline !== 0) longDeadlines.delete(this);
  }

  /** Throws (and answers) DEADLINE_EXCEEDED if the deadline has passed or the call is already over. */
  checkDeadline(): void {
    if (this.deadline !== 0 && performance.now() >= this.deadline) this.expire();
    if (this.aborted) throw this.reason ?? new ConnectError("the call is over", Code.Canceled);
  }

  /** The deadline passed: answer DEADLINE_EXCEEDED now; whatever the handler returns later is dropped. */
  expire(): void {
    if (this.done) return;
    const err = new ConnectError("the operation timed out", Code.DeadlineExceeded);
    this.abort(err);
    this.fail(err);
  }

  /** The stream closed: after our answer that is the normal end; before it, the client cancelled or the connection went. */
  closed(): void {
    if (this.done) return;
    this.finish();
    this.abort(new ConnectError("the client cancelled the call", Code.Canceled));
  }

  private respond(res: UnaryResponse): void {
    if (this.done) return;
    this.finish();
    const stream = this.stream;
    if (stream.destroyed || stream.closed) return this.abort(new ConnectError("the client cancelled the call", Code.Canceled));
    let out: Uint8Array;
    try {
      out = this.method.encode(res.message);
    } catch {
      return this.writeError(new ConnectError("internal error", Code.Internal));
    }
    const length = out.length - 5;
    if (length > this.writeMaxBytes) return this.writeError(tooLarge("response message", length, this.writeMaxBytes));
    out[0] = 0;
    out[1] = length >>> 24;
    out[2] = (length >>> 16) & 255;
    out[3] = (length >>> 8) & 255;
    out[4] = length & 255;
    const headers: http2.OutgoingHttpHeaders = { ":status": 200, "content-type": this.ct };
    const header = res === this.baseResponse ? this.header : res.header;
    header?.forEach((v, k) => (headers[k] = v));
    const trailers: http2.OutgoingHttpHeaders = { "grpc-status": "0" };
    const trailer = res === this.baseResponse ? this.trailer : res.trailer;
    trailer?.forEach((v, k) => (trailers[k] = v));
    this.trailers = trailers;
    try {
      stream.respond(headers, { waitForTrailers: true });
      stream.on("wantTrailers", onWantTrailers);
      stream.end(out);
    } catch {
      stream.destroy();
    }
    this.abort(CALL_OVER);
  }

  sendTrailers(): void {
    try {
      this.stream.sendTrailers(this.trailers!);
    } catch {
      this.stream.destroy();
    }
  }

  /** Ends the call with an error status, unless it is already answered. */
  private fail(err: ConnectError): void {
    if (this.done) return;
    this.finish();
    this.writeError(err);
    this.abort(err);
  }

  /**
   * The error status, with the metadata the handler set, as Connect-Node and
   * grpc-go send it: the status, the error's metadata and the handler's
   * trailers in the trailers; the handler's headers, if it set any, in a
   * headers frame of their own before them — otherwise one trailers-only
   * response. Stops the client's upload if it is still sending.
   */
  private writeError(err: ConnectError): void {
    const stream = this.stream;
    if (stream.destroyed || stream.closed || stream.headersSent) return;
    const headers: http2.OutgoingHttpHeaders = { ":status": 200, "content-type": this.ct };
    const status = grpcStatusHeaders(err, this.trailer);
    try {
      const sending = clientStillSending(stream);
      if (this.header && hasEntries(this.header)) {
        this.header.forEach((v, k) => (headers[k] = v));
        this.trailers = status;
        stream.respond(headers, { waitForTrailers: true });
        stream.on("wantTrailers", onWantTrailers);
        stream.end();
      } else {
        Object.assign(headers, status);
        stream.respond(headers, { endStream: true });
      }
      if (sending) stopUpload(stream);
    } catch {
      stream.destroy();
    }
  }
}
