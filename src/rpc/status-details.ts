import { create, toBinary } from "@bufbuild/protobuf";
import { BinaryWriter } from "@bufbuild/protobuf/wire";
import type { ConnectError } from "@connectrpc/connect";
import { BadRequestSchema } from "../../gen/google/rpc/error_details_pb.js";

/**
 * Error details (google.rpc.Status.details) the way generated clients read them.
 * Connect-Node sends a ConnectError's details itself — as `details` in a Connect
 * error, as the `grpc-status-details-bin` trailer in gRPC and gRPC-Web. Transports
 * that write gRPC statuses by hand (the lean unary path) use
 * `grpcStatusDetailsBin` for the same trailer.
 */

/** The detail of an INVALID_ARGUMENT error: one google.rpc.BadRequest field violation. */
export function badRequestDetail(field: string, description: string) {
  return { desc: BadRequestSchema, value: { fieldViolations: [{ field, description }] } };
}

/**
 * The value of the `grpc-status-details-bin` trailer for `err`: a
 * google.rpc.Status (code, message, details as google.protobuf.Any), base64
 * without padding as gRPC binary headers are sent; null when the error has no
 * details (then grpc-status and grpc-message say everything).
 */
export function grpcStatusDetailsBin(err: ConnectError): string | null {
  if (err.details.length === 0) return null;
  // google.rpc.Status { int32 code = 1; string message = 2; repeated google.protobuf.Any details = 3; }
  const w = new BinaryWriter();
  w.uint32((1 << 3) | 0).int32(err.code);
  if (err.rawMessage) w.uint32((2 << 3) | 2).string(err.rawMessage);
  for (const d of err.details) {
    const [typeName, value] = "desc" in d ? [d.desc.typeName, toBinary(d.desc, create(d.desc, d.value))] : [d.type, d.value];
    // google.protobuf.Any { string type_url = 1; bytes value = 2; }
    w.uint32((3 << 3) | 2)
      .fork()
      .uint32((1 << 3) | 2)
      .string(`type.googleapis.com/${typeName}`)
      .uint32((2 << 3) | 2)
      .bytes(value)
      .join();
  }
  return Buffer.from(w.finish()).toString("base64").replace(/=+$/, "");
}
