import { Writable } from "node:stream";
import type { UnaryRequest, UnaryResponse } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { UnavailableError } from "../../src/domain/errors.js";
import { createLogger } from "../../src/observability/logger.js";
import { createMetrics } from "../../src/observability/metrics.js";
import { createObservabilityInterceptor } from "../../src/rpc/interceptors.js";

// The request id is made only when a call logs a line (not on every call), and
// every line of one call carries the same one.

function setup() {
  const lines: { requestId?: string; msg: string; level: string }[] = [];
  const logger = createLogger(
    "debug",
    new Writable({
      write(chunk, _enc, done) {
        for (const l of String(chunk).split("\n").filter(Boolean)) lines.push(JSON.parse(l));
        done();
      },
    }),
  );
  const interceptor = createObservabilityInterceptor({ logger, metrics: createMetrics() });
  const method = { name: "GetThing" };
  const service = { typeName: "test.v1.Things" };
  const request = (headers: Record<string, string> = {}) => ({ method, service, header: new Headers(headers) }) as unknown as UnaryRequest;
  const flushed = () => new Promise((r) => setImmediate(r));
  return { lines, interceptor, request, flushed };
}

describe("request ids in the observability interceptor's log lines", () => {
  it("gives the error line and the debug line of one failed call the same generated id, and another call another", async () => {
    const { lines, interceptor, request, flushed } = setup();
    const failing = interceptor(async () => {
      throw new Error("boom");
    });
    await expect(failing(request())).rejects.toThrow("internal error");
    await expect(interceptor(async () => Promise.reject(new UnavailableError("store down")))(request())).rejects.toThrow();
    await flushed();
    const [error, debug1, warn, debug2] = lines;
    expect([error.msg, debug1.msg, warn.msg, debug2.msg]).toEqual(["internal error", "rpc", "unavailable", "rpc"]);
    expect(error.requestId).toMatch(/^[0-9a-f]{12}-[0-9a-z]+$/);
    expect(debug1.requestId).toBe(error.requestId);
    expect(debug2.requestId).toBe(warn.requestId);
    expect(warn.requestId).not.toBe(error.requestId);
  });

  it("uses the caller's x-request-id (cut to 128 characters) for every line", async () => {
    const { lines, interceptor, request, flushed } = setup();
    await interceptor(async () => ({}) as UnaryResponse)(request({ "x-request-id": "r".repeat(300) }));
    await expect(interceptor(async () => Promise.reject(new Error("x")))(request({ "x-request-id": "abc" }))).rejects.toThrow();
    await flushed();
    expect(lines.map((l) => [l.msg, l.requestId])).toEqual([
      ["rpc", "r".repeat(128)],
      ["internal error", "abc"],
      ["rpc", "abc"],
    ]);
  });
});
