import { BadRequestSchema } from "../../gen/google/rpc/error_details_pb.js";

/**
 * Error details (google.rpc.Status.details) the way generated clients read them.
 * A ConnectError's details are sent by Connect-Node — as `details` in a Connect
 * error, as the `grpc-status-details-bin` trailer in gRPC and gRPC-Web — and by
 * the lean unary gRPC path, which writes its trailers with Connect's own
 * `setTrailerStatus`.
 */

/** The detail of an INVALID_ARGUMENT error: one google.rpc.BadRequest field violation. */
export function badRequestDetail(field: string, description: string) {
  return { desc: BadRequestSchema, value: { fieldViolations: [{ field, description }] } };
}
