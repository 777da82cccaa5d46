import { Code } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { BadRequestSchema } from "../../gen/google/rpc/error_details_pb.js";
import { InvalidArgumentError, NotFoundError } from "../../src/domain/errors.js";
import { toConnectError } from "../../src/rpc/interceptors.js";

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
