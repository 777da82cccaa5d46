import { create, fromBinary, isMessage, toBinary, type DescMessage, type DescMethod, type DescService } from "@bufbuild/protobuf";
import {
  Code,
  ConnectError,
  createContextValues,
  createServiceImplSpec,
  type HandlerContext,
  type Interceptor,
  type ServiceImpl,
  type UnaryRequest,
  type UnaryResponse,
} from "@connectrpc/connect";
import type http2 from "node:http2";

/*
 * A lean transport for unary gRPC calls over HTTP/2. Connect-Node serves every
 * protocol through a universal request/response layer (web Headers, async
 * iterables, a linked AbortController and a DOMException per call); profiled
 * under load that layer cost several times the handler itself. Unary gRPC —
 * what backends call VerifyKey with — takes this path instead. It runs the SAME
 * service implementations and the SAME interceptors as the Connect router;
 * only the wire handling differs. Anything it does not handle (streaming,
 * compression, gRPC-Web, Connect, JSON, malformed framing) falls through to
 * Connect-Node unchanged. See docs/performance.md.
 */

export interface ServiceRegistration {
  service: DescService;
  impl: Partial<ServiceImpl<DescService>>;
}

/** A hand-written encoder for a response type, taking the handler's (init-shaped) result. */
export type ResponseEncoder = (message: object) => Uint8Array;

interface Method {
  encode: (message: object) => Uint8Array;
  service: DescService;
  input: DescMessage;
  output: DescMessage;
  run: (req: UnaryRequest) => Promise<UnaryResponse>;
  methodDesc: DescMethod;
}

const MAX_MESSAGE_BYTES = 4 * 1024 * 1024;
/** Never aborts: calls without a deadline share it instead of allocating a controller each. */
const NEVER = new AbortController().signal;

function parseTimeout(v: string | undefined): number | undefined | null {
  if (v === undefined) return undefined;
  const m = /^(\d{1,8})([HMSmun])$/.exec(v);
  if (!m) return null;
  const unit = { H: 3_600_000, M: 60_000, S: 1000, m: 1, u: 0.001, n: 0.000001 }[m[2] as "H"];
  return Number(m[1]) * unit;
}

/** gRPC percent-encoding of grpc-message. */
function encodeMessage(s: string): string {
  return s.replace(/[^\x20-\x24\x26-\x7e]/gu, (c) => encodeURIComponent(c));
}

function headersOf(raw: http2.IncomingHttpHeaders): Headers {
  const h = new Headers();
  for (const k in raw) {
    if (k.charCodeAt(0) === 58 /* ":" */) continue;
    const v = raw[k];
    if (v === undefined) continue;
    if (Array.isArray(v)) for (const x of v) h.append(k, x);
    else h.append(k, v);
  }
  return h;
}

/**
 * Returns a request handler that serves unary gRPC calls of the given services
 * and returns false for any request it leaves to Connect-Node.
 */
export function createGrpcUnaryHandler(
  services: ServiceRegistration[],
  interceptors: Interceptor[],
  /** By response type name. Results of such methods reach interceptors as returned (init shape). */
  encoders: Map<string, ResponseEncoder> = new Map(),
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
        const ctx = (req as unknown as { ctx: HandlerContext & { requestHeader: Headers; values: unknown } }).ctx;
        ctx.requestHeader = req.header;
        ctx.values = req.contextValues;
        const out = await s.impl(req.message as never, ctx);
        return {
          stream: false,
          service,
          method: m,
          header: ctx.responseHeader,
          trailer: ctx.responseTrailer,
          message: custom || isMessage(out, m.output) ? out : create(m.output, out as never),
        } as UnaryResponse;
      };
      const run = interceptors.reduceRight<(r: UnaryRequest) => Promise<UnaryResponse>>((next, i) => i(next as never) as never, base);
      const encode: (message: object) => Uint8Array = custom ?? ((msg) => toBinary(m.output, msg as never));
      methods.set(`/${service.typeName}/${m.name}`, { encode, service, input: m.input, output: m.output, run, methodDesc: m });
    }
  }

  return function handle(stream: http2.ServerHttp2Stream, h: http2.IncomingHttpHeaders): boolean {
    const ct = h["content-type"];
    if (ct !== "application/grpc" && ct !== "application/grpc+proto") return false;
    const enc = h["grpc-encoding"];
    if (enc !== undefined && enc !== "identity") return false;
    const method = methods.get(h[":path"] ?? "");
    if (!method || h[":method"] !== "POST") return false;
    const timeoutMs = parseTimeout(h["grpc-timeout"] as string | undefined);
    if (timeoutMs === null) return false;
    serve(stream, h, method, ct, timeoutMs);
    return true;
  };

  function serve(stream: http2.ServerHttp2Stream, raw: http2.IncomingHttpHeaders, method: Method, ct: string, timeoutMs: number | undefined) {
    const chunks: Buffer[] = [];
    let size = 0;
    let tooBig = false;
    stream.on("data", (c: Buffer) => {
      size += c.length;
      if (size > MAX_MESSAGE_BYTES + 5) tooBig = true;
      else chunks.push(c);
    });
    stream.once("end", () => {
      try {
        dispatch();
      } catch {
        // Never let one call take the process down.
        fail(stream, ct, new ConnectError("internal error", Code.Internal));
      }
    });
    stream.on("error", () => undefined);

    function dispatch() {
      if (tooBig) return fail(stream, ct, new ConnectError("message larger than 4 MiB", Code.ResourceExhausted));
      const body = chunks.length === 1 ? chunks[0] : Buffer.concat(chunks, size);
      if (body.length < 5 || body[0] !== 0 || body.readUInt32BE(1) !== body.length - 5) {
        return fail(stream, ct, new ConnectError("expected exactly one uncompressed message", Code.InvalidArgument));
      }
      let message;
      try {
        message = fromBinary(method.input, body.subarray(5));
      } catch (err) {
        return fail(stream, ct, new ConnectError(`cannot decode request: ${(err as Error).message}`, Code.InvalidArgument));
      }
      // Signal and URL are built only if something reads them; unary handlers rarely do.
      let signal: AbortSignal | undefined;
      const getSignal = () =>
        (signal ??= timeoutMs === undefined ? NEVER : AbortSignal.timeout(Math.max(1, Math.ceil(timeoutMs))));
      let url: string | undefined;
      const getUrl = () => (url ??= `http://${raw[":authority"] ?? "localhost"}${raw[":path"]}`);
      const header = headersOf(raw);
      const values = createContextValues();
      let responseHeader: Headers | undefined;
      let responseTrailer: Headers | undefined;
      const ctx = {
        method: method.methodDesc,
        service: method.service,
        protocolName: "grpc",
        requestMethod: "POST",
        get url() {
          return getUrl();
        },
        get peer() {
          return { addr: stream.session?.socket?.remoteAddress ?? "" };
        },
        get signal() {
          return getSignal();
        },
        timeoutMs: () => timeoutMs,
        requestHeader: header,
        get responseHeader() {
          return (responseHeader ??= new Headers());
        },
        get responseTrailer() {
          return (responseTrailer ??= new Headers());
        },
        values,
        abort() {},
      } as unknown as HandlerContext;
      const req = {
        stream: false,
        service: method.service,
        method: method.methodDesc,
        requestMethod: "POST",
        get url() {
          return getUrl();
        },
        get signal() {
          return getSignal();
        },
        header,
        contextValues: values,
        message,
        ctx,
      } as unknown as UnaryRequest;
      method.run(req).then(
        (res) => {
          if (stream.destroyed) return;
          const bytes = method.encode(res.message);
          const out = Buffer.allocUnsafe(5 + bytes.length);
          out[0] = 0;
          out.writeUInt32BE(bytes.length, 1);
          out.set(bytes, 5);
          const headers: http2.OutgoingHttpHeaders = { ":status": 200, "content-type": ct };
          responseHeader?.forEach((v, k) => (headers[k] = v));
          stream.respond(headers, { waitForTrailers: true });
          stream.once("wantTrailers", () => {
            const trailers: http2.OutgoingHttpHeaders = { "grpc-status": "0" };
            responseTrailer?.forEach((v, k) => (trailers[k] = v));
            stream.sendTrailers(trailers);
          });
          stream.end(out);
        },
        (err) => fail(stream, ct, err instanceof ConnectError ? err : new ConnectError("internal error", Code.Internal)),
      );
    }
  }

  /** A trailers-only response carrying the status. */
  function fail(stream: http2.ServerHttp2Stream, ct: string, err: ConnectError) {
    if (stream.destroyed || stream.headersSent) return;
    stream.respond(
      {
        ":status": 200,
        "content-type": ct,
        "grpc-status": String(err.code),
        "grpc-message": encodeMessage(err.rawMessage),
      },
      { endStream: true },
    );
  }
}
