import * as grpc from "@grpc/grpc-js";
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { HealthCheckRequestSchema, HealthCheckResponseSchema, HealthCheckResponse_ServingStatus } from "../gen/grpc/health/v1/health_pb.js";

/** Baseline: the same do-nothing unary RPC on a plain @grpc/grpc-js server. */
const server = new grpc.Server();
server.addService(
  {
    check: {
      path: "/grpc.health.v1.Health/Check",
      requestStream: false,
      responseStream: false,
      requestDeserialize: (b: Buffer) => fromBinary(HealthCheckRequestSchema, b),
      requestSerialize: (m: any) => Buffer.from(toBinary(HealthCheckRequestSchema, m)),
      responseSerialize: (m: any) => Buffer.from(toBinary(HealthCheckResponseSchema, m)),
      responseDeserialize: (b: Buffer) => fromBinary(HealthCheckResponseSchema, b),
    },
  },
  {
    check: (_call: unknown, cb: grpc.sendUnaryData<unknown>) => cb(null, { $typeName: "grpc.health.v1.HealthCheckResponse", status: HealthCheckResponse_ServingStatus.SERVING }),
  },
);
server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (err, port) => {
  if (err) throw err;
  process.stdout.write(JSON.stringify({ port }) + "\n");
});
process.on("SIGTERM", () => process.exit(0));
