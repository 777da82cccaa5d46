import { connectNodeAdapter } from "@connectrpc/connect-node";
import http2 from "node:http2";
import { Health, HealthCheckResponse_ServingStatus } from "../gen/grpc/health/v1/health_pb.js";

/** Baseline: a do-nothing unary RPC (Health/Check) on a bare Connect-Node server. */
const server = http2.createServer(
  connectNodeAdapter({
    routes: (router) => router.service(Health, { check: () => ({ status: HealthCheckResponse_ServingStatus.SERVING }), async *watch() {} }),
  }),
);
server.listen(0, "127.0.0.1", () => {
  process.stdout.write(JSON.stringify({ port: (server.address() as { port: number }).port }) + "\n");
});
process.on("SIGTERM", () => process.exit(0));
