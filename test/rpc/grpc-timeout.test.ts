import { describe, expect, it } from "vitest";
import { grpcTimeoutUnitMs, parseGrpcTimeout } from "../../src/rpc/grpc-timeout.js";

// The grpc-timeout header as the gRPC spec writes it: TimeoutValue (1–8 digits) TimeoutUnit (H M S m u n).
const SPEC = /^(\d{1,8})([HMSmun])$/;
const UNITS: Record<string, number> = { H: 3_600_000, M: 60_000, S: 1000, m: 1, u: 0.001, n: 0.000001 };
const bySpec = (v: string) => {
  const m = SPEC.exec(v);
  return m ? Number(m[1]) * UNITS[m[2]] : null;
};

describe("grpc-timeout", () => {
  it("reads every unit and the longest value", () => {
    expect(parseGrpcTimeout("1H")).toBe(3_600_000);
    expect(parseGrpcTimeout("2M")).toBe(120_000);
    expect(parseGrpcTimeout("20S")).toBe(20_000);
    expect(parseGrpcTimeout("19999m")).toBe(19_999);
    expect(parseGrpcTimeout("1500u")).toBe(1.5);
    expect(parseGrpcTimeout("99999999n")).toBeCloseTo(99.999999, 9);
    expect(parseGrpcTimeout("0m")).toBe(0);
    expect(parseGrpcTimeout("00000007S")).toBe(7000);
    expect(grpcTimeoutUnitMs("5S")).toBe(1000);
  });

  it("refuses what the spec does not allow", () => {
    for (const bad of ["", "S", "5", "123456789S", "5s", "5 S", " 5S", "5S ", "-5S", "+5S", "5.0S", "5x", "٥S", "5SS", "\u00005S"]) {
      expect(parseGrpcTimeout(bad), JSON.stringify(bad)).toBeNull();
      expect(grpcTimeoutUnitMs(bad), JSON.stringify(bad)).toBeUndefined();
    }
  });

  it("agrees with the spec's grammar on every short string over digits, units and other characters", () => {
    const alphabet = ["0", "1", "9", "H", "M", "S", "m", "u", "n", "x", " ", "-"];
    const strings: string[] = [""];
    for (let len = 1; len <= 4; len++) {
      for (const prefix of strings.filter((s) => s.length === len - 1)) for (const c of alphabet) strings.push(prefix + c);
    }
    for (const v of [...strings, "12345678S", "123456789S", "99999999H"]) expect(parseGrpcTimeout(v), JSON.stringify(v)).toBe(bySpec(v));
  });
});
