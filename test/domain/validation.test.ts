import { describe, expect, it } from "vitest";
import { InvalidArgumentError } from "../../src/domain/errors.js";
import { ID_PATTERNS, newId } from "../../src/domain/ids.js";
import type { Credits, Ratelimit } from "../../src/domain/types.js";
import {
  LIMITS,
  checkAmount,
  checkApiId,
  checkByteLength,
  checkCredits,
  checkExternalId,
  checkKeyName,
  checkMeta,
  checkPageSize,
  checkPermissions,
  checkPrefix,
  checkRatelimits,
} from "../../src/domain/validation.js";

/** The field an InvalidArgumentError names. */
function refusedField(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(InvalidArgumentError);
    const e = err as InvalidArgumentError;
    expect(e.message).toBe(`${e.field}: ${e.reason}`);
    return e.field;
  }
  throw new Error("expected an InvalidArgumentError");
}

const rl = (over: Partial<Ratelimit> = {}): Ratelimit => ({ name: "rpm", limit: 10, durationMs: 60_000, autoApply: false, ...over });

describe("external ids", () => {
  it.each([
    "user_2NNEqL2nrIRdJ194ndJqAHwEfxC",
    "org_01EHZNVPK3SFK441A1RGBFSHRT",
    "auth0|5f7c8ec7c33c6c004bbafe82",
    "google-oauth2|104737485674920474633",
    "a+b@c.d:e",
    "x",
    "x".repeat(255),
  ])("accepts %s", (id) => {
    expect(checkExternalId("external_id", id)).toBe(id);
  });

  it.each(["", "x".repeat(256), "a b", "a/b", "a#b", '{"$gt": ""}', "$where", "ü", "a\nb", "a\n", "a\u0000"])("refuses %j", (id) => {
    expect(refusedField(() => checkExternalId("external_id", id))).toBe("external_id");
  });
});

describe("api ids and prefixes", () => {
  it.each(["api", "A", "api_live.v2-eu", "0", "a".repeat(64)])("accepts the api_id %s", (v) => {
    expect(checkApiId("api_id", v)).toBe(v);
  });

  it.each(["", "_api", ".api", "-api", "a b", "a/b", "a".repeat(65), "$where"])("refuses the api_id %j", (v) => {
    expect(refusedField(() => checkApiId("api_id", v))).toBe("api_id");
  });

  it.each(["", "sk", "Live2", "a".repeat(16)])("accepts the prefix %j", (v) => {
    expect(checkPrefix("prefix", v)).toBe(v);
  });

  it.each(["2sk", "sk_", "sk-live", "a".repeat(17), " sk"])("refuses the prefix %j", (v) => {
    expect(refusedField(() => checkPrefix("prefix", v))).toBe("prefix");
  });

  it("takes 0 bytes as the 16-byte default and refuses lengths outside 16-64", () => {
    expect(checkByteLength("byte_length", 0)).toBe(16);
    expect(checkByteLength("byte_length", 64)).toBe(64);
    for (const n of [15, 65, -16, 16.5]) expect(refusedField(() => checkByteLength("byte_length", n))).toBe("byte_length");
  });
});

describe("key names", () => {
  it("accept up to 255 characters, and empty", () => {
    expect(checkKeyName("name", "")).toBe("");
    expect(checkKeyName("name", "é".repeat(255))).toHaveLength(255);
  });

  it("refuse 256 characters and control characters", () => {
    expect(refusedField(() => checkKeyName("name", "n".repeat(256)))).toBe("name");
    expect(refusedField(() => checkKeyName("key.name", "tab\there"))).toBe("key.name");
  });
});

describe("meta", () => {
  const props = (n: number) => Object.fromEntries(Array.from({ length: n }, (_, i) => [`k${i}`, i]));

  it("accepts 100 top-level properties, nesting not counted", () => {
    expect(checkMeta("meta", { ...props(99), nested: props(500) })).toBeTruthy();
  });

  it("refuses 101 top-level properties", () => {
    expect(refusedField(() => checkMeta("meta", props(101)))).toBe("meta");
  });

  it("accepts exactly 64 KiB of JSON and refuses one byte more", () => {
    const overhead = JSON.stringify({ b: "" }).length;
    const exact = { b: "x".repeat(LIMITS.metaBytes - overhead) };
    expect(Buffer.byteLength(JSON.stringify(exact))).toBe(64 * 1024);
    expect(checkMeta("meta", exact)).toBe(exact);
    expect(refusedField(() => checkMeta("meta", { b: "x".repeat(LIMITS.metaBytes - overhead + 1) }))).toBe("meta");
  });

  it("counts bytes, not characters", () => {
    const overhead = JSON.stringify({ b: "" }).length;
    // "é" is two bytes in UTF-8: half as many characters reach the limit.
    expect(refusedField(() => checkMeta("meta", { b: "é".repeat((LIMITS.metaBytes - overhead) / 2 + 1) }))).toBe("meta");
  });

  it("refuses nesting deeper than 32 levels", () => {
    let deep: Record<string, unknown> = {};
    for (let i = 0; i < 40; i++) deep = { d: deep };
    expect(refusedField(() => checkMeta("key.meta", deep as never))).toBe("key.meta");
  });

  it("refuses an array or null in place of an object", () => {
    expect(refusedField(() => checkMeta("meta", [] as never))).toBe("meta");
    expect(refusedField(() => checkMeta("meta", null as never))).toBe("meta");
  });
});

describe("ratelimits", () => {
  it("accept 50 limits and refuse 51", () => {
    const list = (n: number) => Array.from({ length: n }, (_, i) => rl({ name: `r${i}` }));
    expect(checkRatelimits("ratelimits", list(50))).toHaveLength(50);
    expect(refusedField(() => checkRatelimits("ratelimits", list(51)))).toBe("ratelimits");
  });

  it("accept names of 1 and 128 characters, a limit of 1 and a duration of 1s", () => {
    expect(checkRatelimits("ratelimits", [rl({ name: "a", limit: 1, durationMs: 1000 }), rl({ name: "b".repeat(128) })])).toHaveLength(2);
  });

  it.each([
    ["an empty name", [rl({ name: "" })], "ratelimits[0].name"],
    ["a 129-character name", [rl(), rl({ name: "n".repeat(129) })], "ratelimits[1].name"],
    ["a name with $", [rl({ name: "$inc" })], "ratelimits[0].name"],
    ["a duplicate name", [rl(), rl()], "ratelimits[1].name"],
    ["a limit of 0", [rl({ limit: 0 })], "ratelimits[0].limit"],
    ["a fractional limit", [rl({ limit: 1.5 })], "ratelimits[0].limit"],
    ["a duration of 999ms", [rl({ durationMs: 999 })], "ratelimits[0].duration"],
    ["a duration that is not whole seconds", [rl({ durationMs: 1500 })], "ratelimits[0].duration"],
    ["a fractional duration", [rl({ durationMs: 1000.5 })], "ratelimits[0].duration"],
    ["a duration over 30 days", [rl({ durationMs: LIMITS.maxDurationMs + 1 })], "ratelimits[0].duration"],
  ])("refuse %s, naming the entry", (_what, list, field) => {
    expect(refusedField(() => checkRatelimits("ratelimits", list))).toBe(field);
  });
});

describe("permissions", () => {
  it("drop duplicates and keep order", () => {
    expect(checkPermissions("permissions", ["b", "a", "b", "docs/*", "x:y.z"])).toEqual(["b", "a", "docs/*", "x:y.z"]);
  });

  it("refuse bad entries by index and more than 100", () => {
    expect(refusedField(() => checkPermissions("permissions", ["ok", "a b"]))).toBe("permissions[1]");
    expect(refusedField(() => checkPermissions("permissions", [""]))).toBe("permissions[0]");
    expect(refusedField(() => checkPermissions("permissions", ["p".repeat(129)]))).toBe("permissions[0]");
    expect(refusedField(() => checkPermissions("permissions", Array.from({ length: 101 }, (_, i) => `p${i}`)))).toBe("permissions");
  });
});

describe("credits", () => {
  const monthly = (day: number | null): Credits => ({ remaining: 1, refill: { interval: "monthly", amount: 5, refillDay: day, lastRefillAt: 0 } });

  it("accept unlimited, zero, and monthly refills on days 1 to 31", () => {
    expect(checkCredits("credits", null)).toBeNull();
    expect(checkCredits("credits", { remaining: 0, refill: null })).toEqual({ remaining: 0, refill: null });
    for (const day of [1, 28, 31]) expect(checkCredits("credits", monthly(day))).toEqual(monthly(day));
  });

  it.each([
    ["a negative balance", { remaining: -1, refill: null }, "credits.remaining"],
    ["a fractional balance", { remaining: 0.5, refill: null }, "credits.remaining"],
    ["a negative refill", { remaining: 1, refill: { interval: "daily", amount: -1, refillDay: null, lastRefillAt: 0 } }, "credits.refill.amount"],
    ["a daily refill with a day", { remaining: 1, refill: { interval: "daily", amount: 1, refillDay: 3, lastRefillAt: 0 } }, "credits.refill.refill_day"],
    ["a monthly refill on day 0", monthly(0), "credits.refill.refill_day"],
    ["a monthly refill on day 32", monthly(32), "credits.refill.refill_day"],
    ["a monthly refill without a day", monthly(null), "credits.refill.refill_day"],
  ] as [string, Credits, string][])("refuse %s", (_what, c, field) => {
    expect(refusedField(() => checkCredits("credits", c))).toBe(field);
  });

  it("refuse negative and fractional amounts", () => {
    expect(checkAmount("value", 0)).toBe(0);
    for (const v of [-1, 0.5, Number.MAX_SAFE_INTEGER + 2]) expect(refusedField(() => checkAmount("value", v))).toBe("value");
  });
});

describe("page sizes", () => {
  it("default 0 to 50 and accept 1 to 100", () => {
    expect(checkPageSize("page_size", 0)).toBe(50);
    expect(checkPageSize("page_size", 1)).toBe(1);
    expect(checkPageSize("page_size", 100)).toBe(100);
  });

  it.each([101, -1, 1_000_000])("refuse %i", (n) => {
    expect(refusedField(() => checkPageSize("page_size", n))).toBe("page_size");
  });
});

describe("ids", () => {
  it("carry their type and sort by creation time", () => {
    const earlier = newId("key", 1_700_000_000_000);
    const later = newId("key", 1_700_000_000_001);
    expect(earlier).toMatch(ID_PATTERNS.key);
    expect(newId("id")).toMatch(ID_PATTERNS.identity);
    expect(newId("root")).toMatch(ID_PATTERNS.root);
    expect(earlier < later).toBe(true);
    expect(ID_PATTERNS.key.test(newId("id"))).toBe(false);
  });
});
