import { Histogram, Registry } from "prom-client";
import { describe, expect, it } from "vitest";
import { FastHistogram } from "../../src/observability/metrics.js";

// The RPC duration histogram counts in plain numbers (no labels object hashed per
// observation); what a scrape reads must be what prom-client's Histogram gives.
const BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5];

function both() {
  const a = new Registry();
  const b = new Registry();
  const reference = new Histogram({ name: "h_seconds", help: "help text", labelNames: ["method", "code"] as const, buckets: BUCKETS, registers: [a] });
  const fast = new FastHistogram<"method" | "code">({ name: "h_seconds", help: "help text", buckets: BUCKETS, registers: [b] });
  return { a, b, reference, fast };
}

describe("FastHistogram", () => {
  it("reads out exactly as prom-client's Histogram for the same observations", async () => {
    const { a, b, reference, fast } = both();
    const values = [0, 0.0001, 0.0005, 0.0007, 0.001, 0.003, 0.02, 0.3, 0.99, 1, 4.9, 5, 7, 120];
    const sets = [
      { method: "latchkey.v1.KeyService/VerifyKey", code: "ok" },
      { method: "latchkey.v1.KeyService/VerifyKey", code: "DeadlineExceeded" },
      { method: "grpc.health.v1.Health/Check", code: "ok" },
    ];
    sets.forEach((labels, n) => {
      const child = fast.labels(labels);
      values.slice(n).forEach((v) => {
        reference.observe(labels, v);
        child.observe(v);
      });
    });
    expect(await b.metrics()).toBe(await a.metrics());
    // (prom-client also lists an empty exemplar per value; exemplars are not used.)
    const withoutExemplars = async (r: Registry) => (await r.getMetricsAsJSON()).map((m) => ({ ...m, values: m.values.map((v) => { const { exemplar: _, ...rest } = v as typeof v & { exemplar?: unknown }; return rest; }) }));
    expect(await withoutExemplars(b)).toEqual(await withoutExemplars(a));
  });

  it("keeps one series per label set whatever the order of its labels, and starts again on reset", async () => {
    const { a, b, reference, fast } = both();
    fast.labels({ method: "m", code: "ok" }).observe(0.002);
    fast.labels({ code: "ok", method: "m" } as { method: string; code: string }).observe(0.2);
    reference.observe({ method: "m", code: "ok" }, 0.002);
    reference.observe({ method: "m", code: "ok" }, 0.2);
    expect(await b.metrics()).toBe(await a.metrics());
    expect(await b.metrics()).toMatch(/^h_seconds_count\{method="m",code="ok"\} 2$/m);
    b.resetMetrics();
    expect(await b.metrics()).toMatch(/^h_seconds_count\{method="m",code="ok"\} 0$/m);
  });

  it("ignores a value that is not a finite number instead of poisoning the sum", async () => {
    const { b, fast } = both();
    const child = fast.labels({ method: "m", code: "ok" });
    child.observe(Number.NaN);
    child.observe(Number.POSITIVE_INFINITY);
    child.observe(0.01);
    const text = await b.metrics();
    expect(text).toMatch(/^h_seconds_sum\{method="m",code="ok"\} 0.01$/m);
    expect(text).toMatch(/^h_seconds_count\{method="m",code="ok"\} 1$/m);
  });
});
