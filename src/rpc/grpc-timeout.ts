/**
 * The `grpc-timeout` header: 1–8 ASCII digits and a unit (H, M, S, m, u, n).
 * Read without a regular expression or a match array: both the lean gRPC path
 * and VerifyKey's commit point read it on every call.
 */

/** Milliseconds per unit, by the unit's character code. */
const UNIT_MS: Record<number, number> = {
  72 /* H */: 3_600_000,
  77 /* M */: 60_000,
  83 /* S */: 1000,
  109 /* m */: 1,
  117 /* u */: 0.001,
  110 /* n */: 0.000001,
};

/** The milliseconds of the header's unit, or undefined if the header is not a valid grpc-timeout. */
export function grpcTimeoutUnitMs(v: string): number | undefined {
  const n = v.length;
  if (n < 2 || n > 9) return undefined;
  for (let i = 0; i < n - 1; i++) {
    const c = v.charCodeAt(i);
    if (c < 48 || c > 57) return undefined;
  }
  return UNIT_MS[v.charCodeAt(n - 1)];
}

/** The timeout in milliseconds, or null if the header is not a valid grpc-timeout. */
export function parseGrpcTimeout(v: string): number | null {
  const unit = grpcTimeoutUnitMs(v);
  if (unit === undefined) return null;
  let value = 0;
  for (let i = 0; i < v.length - 1; i++) value = value * 10 + (v.charCodeAt(i) - 48);
  return value * unit;
}
