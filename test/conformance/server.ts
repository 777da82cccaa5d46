/**
 * The server side of the Connect conformance suite (connectconformance
 * --mode server), built on Latchkey's own transport: the same createServer
 * (one port, the lean unary gRPC path in front of Connect-Node, TLS by ALPN),
 * the same interceptor as every Latchkey service, serving ConformanceService.
 *
 * Protocol of the runner (docs/testing_servers.md): read one size-delimited
 * ServerCompatRequest on stdin, start a server, write a size-delimited
 * ServerCompatResponse on stdout, serve until SIGTERM.
 *
 * Run by .ci/conformance; see docs/conformance.md.
 */
import { create, createRegistry, fromBinary, toBinary } from "@bufbuild/protobuf";
import type { ConnectRouter, HandlerContext } from "@connectrpc/connect";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { createObservabilityInterceptor } from "../../src/rpc/interceptors.js";
import type { ServiceRegistration } from "../../src/server/grpc-unary.js";
import { createServer } from "../../src/server/http-server.js";
import { createLogger } from "../../src/observability/logger.js";
import { createMetrics } from "../../src/observability/metrics.js";
import { ServerCompatRequestSchema, ServerCompatResponseSchema } from "./gen/connectrpc/conformance/v1/server_compat_pb.js";
import { ConformanceService, file_connectrpc_conformance_v1_service } from "./gen/connectrpc/conformance/v1/service_pb.js";
import { createConformanceService } from "./service.js";

/** Handler calls by path and method, and unary gRPC calls the lean path should have taken but Connect-Node served. */
interface Stats {
  lean: Record<string, number>;
  connect: Record<string, number>;
  fellThrough: number;
}

/** What the lean path takes (grpc-unary.ts): unary gRPC, proto, no compression (gRPC runs over HTTP/2 only). */
function leanShaped(ctx: HandlerContext): boolean {
  const ct = ctx.requestHeader.get("content-type");
  const enc = ctx.requestHeader.get("grpc-encoding");
  return ctx.protocolName === "grpc" && (ct === "application/grpc" || ct === "application/grpc+proto") && (enc === null || enc === "identity");
}

/**
 * The implementation with every handler call counted for `path`, so a run can
 * show that the lean path served the calls it is meant to take (and that none
 * of them fell through to Connect-Node).
 */
function countCalls(impl: object, stats: Stats, path: "lean" | "connect"): object {
  const out: Record<string, unknown> = {};
  for (const [name, fn] of Object.entries(impl as Record<string, (req: unknown, ctx: HandlerContext) => unknown>)) {
    const unary = ConformanceService.method[name as keyof typeof ConformanceService.method].methodKind === "unary";
    out[name] = (req: unknown, ctx: HandlerContext) => {
      stats[path][name] = (stats[path][name] ?? 0) + 1;
      if (path === "connect" && unary && leanShaped(ctx)) stats.fellThrough++;
      return fn(req, ctx);
    };
  }
  return out;
}

async function readRequest(): Promise<Uint8Array> {
  const chunks: Buffer[] = [];
  for await (const c of process.stdin) {
    chunks.push(c as Buffer);
    const all = Buffer.concat(chunks);
    if (all.length >= 4 && all.length >= 4 + all.readUInt32BE(0)) return all.subarray(4, 4 + all.readUInt32BE(0));
  }
  throw new Error("stdin ended before a ServerCompatRequest arrived");
}

async function main(): Promise<void> {
  const req = fromBinary(ServerCompatRequestSchema, await readRequest());
  if (req.clientTlsCert.length > 0) throw new Error("client certificates are not supported (config: supportsTlsClientCerts: false)");

  let tls: { certFile: string; keyFile: string } | null = null;
  let dir: string | null = null;
  if (req.useTls) {
    if (!req.serverCreds) throw new Error("use_tls without server_creds");
    dir = mkdtempSync(path.join(tmpdir(), "latchkey-conformance-"));
    tls = { certFile: path.join(dir, "cert.pem"), keyFile: path.join(dir, "key.pem") };
    writeFileSync(tls.certFile, req.serverCreds.cert);
    writeFileSync(tls.keyFile, req.serverCreds.key, { mode: 0o600 });
  }

  // The same implementation behind both paths, counted per path (see countCalls).
  const impl = createConformanceService();
  const stats: Stats = { lean: {}, connect: {}, fellThrough: 0 };
  const services = [{ service: ConformanceService, impl: countCalls(impl, stats, "lean") } as unknown as ServiceRegistration];
  const connectImpl = countCalls(impl, stats, "connect");
  const routes = (router: ConnectRouter) => router.service(ConformanceService, connectImpl);
  const logger = createLogger(process.env.CONFORMANCE_LOG_LEVEL ?? "silent", process.stderr);
  const server = createServer({
    routes,
    // CONFORMANCE_LEAN_PATH=off serves every call through Connect-Node, to compare the two.
    services: process.env.CONFORMANCE_LEAN_PATH === "off" ? undefined : services,
    interceptors: [createObservabilityInterceptor({ logger, metrics: createMetrics() })],
    tls,
    // Error details and echoed requests are google.protobuf.Any; the JSON codec needs their types.
    jsonOptions: { registry: createRegistry(file_connectrpc_conformance_v1_service) },
    // Shorter request timeouts than a deployment's: a request that never
    // completes fails its case within 10 s instead of stalling the runner
    // (connectconformance v1.0.7 deadlocks when its client reports nothing for
    // 20 s; docs/conformance.md). The suite's receive limit when it asks for
    // one (responses, which echo the request, keep the default limit).
    limits: {
      headersTimeoutMs: 5000,
      requestTimeoutMs: 10_000,
      ...(req.messageReceiveLimit > 0 ? { maxMessageBytes: req.messageReceiveLimit, maxResponseBytes: 4 * 1024 * 1024 } : {}),
    },
    // The conformance service needs no root key: no `authenticate`.
  });
  const port = await server.listen(0, "127.0.0.1");

  const res = toBinary(
    ServerCompatResponseSchema,
    create(ServerCompatResponseSchema, { host: "127.0.0.1", port, pemCert: req.useTls ? req.serverCreds!.cert : new Uint8Array(0) }),
  );
  const size = Buffer.alloc(4);
  size.writeUInt32BE(res.length);
  process.stdout.write(Buffer.concat([size, res]));

  const stop = () => {
    const statsDir = process.env.CONFORMANCE_STATS_DIR;
    if (statsDir) writeFileSync(path.join(statsDir, `server-${process.pid}.json`), JSON.stringify({ tls: req.useTls, ...stats }));
    void server.close(0).finally(() => {
      if (dir) rmSync(dir, { recursive: true, force: true });
      process.exit(0);
    });
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => {
  process.stderr.write(`conformance server: ${(err as Error).stack ?? err}\n`);
  process.exit(1);
});
