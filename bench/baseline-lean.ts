import type { ConnectRouter } from "@connectrpc/connect";
import { Health, HealthCheckResponse_ServingStatus } from "../gen/grpc/health/v1/health_pb.js";
import type { ServiceRegistration } from "../src/server/grpc-unary.js";
import { createServer } from "../src/server/http-server.js";

/**
 * Baseline: a do-nothing unary RPC (Health/Check) through Latchkey's own
 * transport — the same createServer, front door and lean unary gRPC path the
 * server uses, with a trivial handler and no interceptors — so the transport's
 * cost per call can be read apart from VerifyKey's work.
 */
const impl = { check: () => ({ status: HealthCheckResponse_ServingStatus.SERVING }), async *watch() {} };
const services = [{ service: Health, impl }] as unknown as ServiceRegistration[];
const server = createServer({
  routes: (router: ConnectRouter) => router.service(Health, impl),
  services,
  interceptors: [],
});
const port = await server.listen(0, "127.0.0.1");
process.stdout.write(JSON.stringify({ port }) + "\n");
process.on("SIGTERM", () => process.exit(0));
