import { create, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { anyPack, type Any } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import {
  ConformancePayload_RequestInfoSchema,
  ConformanceService,
  type ConformancePayload,
  type ConformancePayload_RequestInfo,
  type Error as ConformanceError,
  type Header,
  type StreamResponseDefinition,
  type UnaryResponseDefinition,
} from "./gen/connectrpc/conformance/v1/service_pb.js";

/*
 * The Connect conformance suite's ConformanceService, as its server guide
 * (connectrpc.com/conformance docs/testing_servers.md) describes it: echo what
 * was received (headers, timeout, requests, GET query), answer what the
 * request's response definition asks for (data, headers, trailers, delay,
 * error). `unimplemented` is left out on purpose: the framework must answer it.
 */

function headersOf(list: Header[], into: Headers): void {
  for (const h of list) for (const v of h.value) into.append(h.name, v);
}

function requestInfo(ctx: HandlerContext, requests: Any[]): ConformancePayload_RequestInfo {
  const requestHeaders: { name: string; value: string[] }[] = [];
  const byName = new Map<string, string[]>();
  ctx.requestHeader.forEach((value, name) => {
    let values = byName.get(name);
    if (!values) {
      values = [];
      byName.set(name, values);
      requestHeaders.push({ name, value: values });
    }
    values.push(value);
  });
  const timeout = ctx.timeoutMs();
  const info = create(ConformancePayload_RequestInfoSchema, {
    requestHeaders,
    timeoutMs: timeout === undefined ? undefined : BigInt(Math.round(timeout)),
    requests,
  });
  if (ctx.requestMethod === "GET") {
    const queryParams: { name: string; value: string[] }[] = [];
    for (const [name, value] of new URL(ctx.url).searchParams) {
      const last = queryParams.find((q) => q.name === name);
      if (last) last.value.push(value);
      else queryParams.push({ name, value: [value] });
    }
    info.connectGetInfo = { $typeName: "connectrpc.conformance.v1.ConformancePayload.ConnectGetInfo", queryParams: queryParams.map((q) => ({ $typeName: "connectrpc.conformance.v1.Header", ...q })) };
  }
  return info;
}

function errorOf(def: ConformanceError, info: ConformancePayload_RequestInfo | null): ConnectError {
  const details: { type: string; value: Uint8Array }[] = def.details.map((d) => ({ type: d.typeUrl.slice(d.typeUrl.lastIndexOf("/") + 1), value: d.value }));
  const all = info ? [{ desc: ConformancePayload_RequestInfoSchema, value: info }, ...details] : details;
  return new ConnectError(def.message ?? "", def.code as number as Code, undefined, all as never);
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  if (ms <= 0) return Promise.resolve();
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(signal.reason);
    const t = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(t);
      reject(signal.reason);
    };
    signal.addEventListener("abort", onAbort, { once: true });
  });
}

function pack<Desc extends DescMessage>(schema: Desc, msg: MessageShape<Desc>): Any {
  return anyPack(schema, msg);
}

/** One unary answer: headers and trailers, a delay, then the payload or the error. */
async function unaryAnswer(
  def: UnaryResponseDefinition | undefined,
  ctx: HandlerContext,
  requests: Any[],
): Promise<{ payload: ConformancePayload }> {
  const info = requestInfo(ctx, requests);
  if (def) {
    headersOf(def.responseHeaders, ctx.responseHeader);
    headersOf(def.responseTrailers, ctx.responseTrailer);
  }
  await sleep(def?.responseDelayMs ?? 0, ctx.signal);
  if (def?.response.case === "error") throw errorOf(def.response.value, info);
  const data = def?.response.case === "responseData" ? def.response.value : new Uint8Array(0);
  return { payload: { $typeName: "connectrpc.conformance.v1.ConformancePayload", data, requestInfo: info } };
}

/** The conformance service on Connect's ServiceImpl, as Latchkey's own services are. */
export function createConformanceService(): Omit<ServiceImpl<typeof ConformanceService>, "unimplemented"> {
  const m = ConformanceService.method;
  return {
    async unary(req, ctx) {
      return unaryAnswer(req.responseDefinition, ctx, [pack(m.unary.input, req)]);
    },

    async idempotentUnary(req, ctx) {
      return unaryAnswer(req.responseDefinition, ctx, [pack(m.idempotentUnary.input, req)]);
    },

    async clientStream(reqs, ctx) {
      const requests: Any[] = [];
      let def: UnaryResponseDefinition | undefined;
      for await (const req of reqs) {
        if (requests.length === 0) def = req.responseDefinition;
        requests.push(pack(m.clientStream.input, req));
      }
      return unaryAnswer(def, ctx, requests);
    },

    async *serverStream(req, ctx) {
      const def = req.responseDefinition;
      const info = requestInfo(ctx, [pack(m.serverStream.input, req)]);
      yield* streamAnswer(def, ctx, info);
    },

    async *bidiStream(reqs, ctx) {
      let def: StreamResponseDefinition | undefined;
      let fullDuplex = false;
      const requests: Any[] = [];
      let sent = 0;
      let first = true;
      for await (const req of reqs) {
        if (first) {
          first = false;
          def = req.responseDefinition;
          fullDuplex = req.fullDuplex;
          if (def) {
            headersOf(def.responseHeaders, ctx.responseHeader);
            headersOf(def.responseTrailers, ctx.responseTrailer);
          }
        }
        requests.push(pack(m.bidiStream.input, req));
        if (!fullDuplex) continue;
        // Full duplex: one response per request, echoing what came since the last one.
        if (!def || sent >= def.responseData.length) {
          if (def?.error) throw errorOf(def.error, sent === 0 ? requestInfo(ctx, requests) : null);
          continue;
        }
        await sleep(def.responseDelayMs, ctx.signal);
        const info = requestInfo(ctx, requests.splice(0));
        yield { payload: { $typeName: "connectrpc.conformance.v1.ConformancePayload", data: def.responseData[sent], requestInfo: info } };
        sent++;
      }
      if (fullDuplex) {
        if (def?.error) throw errorOf(def.error, sent === 0 ? requestInfo(ctx, requests) : null);
        return;
      }
      // Half duplex: every request first, then the responses.
      yield* streamAnswer(def, ctx, requestInfo(ctx, requests), true);
    },
  };
}

async function* streamAnswer(
  def: StreamResponseDefinition | undefined,
  ctx: HandlerContext,
  info: ConformancePayload_RequestInfo,
  headersSet = false,
): AsyncGenerator<{ payload: ConformancePayload }> {
  if (!def) return;
  if (!headersSet) {
    headersOf(def.responseHeaders, ctx.responseHeader);
    headersOf(def.responseTrailers, ctx.responseTrailer);
  }
  let sent = 0;
  for (const data of def.responseData) {
    await sleep(def.responseDelayMs, ctx.signal);
    yield {
      payload: { $typeName: "connectrpc.conformance.v1.ConformancePayload", data, requestInfo: sent === 0 ? info : undefined },
    };
    sent++;
  }
  if (def.error) throw errorOf(def.error, sent === 0 ? info : null);
}
