import { Code, ConnectError } from "@connectrpc/connect";
import { findTrailerError } from "@connectrpc/connect/protocol-grpc";
import { describe, expect, it } from "vitest";
import { BadRequestSchema } from "../../gen/google/rpc/error_details_pb.js";
import { InvalidArgumentError, NotFoundError } from "../../src/domain/errors.js";
import { toConnectError } from "../../src/rpc/interceptors.js";
import { badRequestDetail, grpcStatusDetailsBin } from "../../src/rpc/status-details.js";

describe("grpc-status-details-bin for transports that write gRPC statuses by hand", () => {
  it("is what gRPC clients decode: the code, the message and the BadRequest field violation", () => {
    const err = new ConnectError("key.name: must be valid UTF-8 text", Code.InvalidArgument, undefined, [badRequestDetail("key.name", "must be valid UTF-8 text")]);
    const bin = grpcStatusDetailsBin(err);
    expect(bin).toMatch(/^[A-Za-z0-9+/]+$/);
    // Connect's own gRPC client reads the status from these trailers.
    const decoded = findTrailerError(new Headers({ "grpc-status": "3", "grpc-status-details-bin": bin! }));
    expect(decoded?.code).toBe(Code.InvalidArgument);
    expect(decoded?.rawMessage).toBe("key.name: must be valid UTF-8 text");
    expect(decoded?.findDetails(BadRequestSchema).map((d) => d.fieldViolations.map((v) => [v.field, v.description]))).toEqual([
      [["key.name", "must be valid UTF-8 text"]],
    ]);
  });

  it("is absent for an error without details", () => {
    expect(grpcStatusDetailsBin(new ConnectError("key not found", Code.NotFound))).toBeNull();
  });
});

describe("domain errors as RPC errors", () => {
  it("gives INVALID_ARGUMENT a google.rpc.BadRequest detail naming the field", () => {
    const { error } = toConnectError(new InvalidArgumentError("ratelimits[2].name", "must be 1-128 characters"));
    expect(error.code).toBe(Code.InvalidArgument);
    expect(error.rawMessage).toBe("ratelimits[2].name: must be 1-128 characters");
    expect(error.findDetails(BadRequestSchema)[0].fieldViolations.map((v) => ({ field: v.field, description: v.description }))).toEqual([
      { field: "ratelimits[2].name", description: "must be 1-128 characters" },
    ]);
  });

  it("adds no details to other codes", () => {
    expect(toConnectError(new NotFoundError("key not found")).error.details).toEqual([]);
  });
});
