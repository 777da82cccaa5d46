/** The credits settings: LATCHKEY_CREDITS_BACKEND and LATCHKEY_CREDITS_FLUSH_MS, their defaults and their errors. */
import { describe, expect, it } from "vitest";
import { ConfigError, loadConfig } from "../../src/config/config.js";

const mongo = { MONGODB_URI: "mongodb://db:27017/" };
const redis = { LATCHKEY_REDIS_URL: "redis://cache:6379" };

describe("credits settings", () => {
  it("holds balances in Redis by default when the mongodb store has Redis, else in the store", () => {
    expect(loadConfig({ ...mongo, ...redis }).creditsBackend).toBe("redis");
    expect(loadConfig({ ...mongo }).creditsBackend).toBe("store");
    expect(loadConfig({ ...redis }).creditsBackend, "the embedded store is one process").toBe("store");
    expect(loadConfig({ ...mongo, ...redis, LATCHKEY_CREDITS_BACKEND: "store" }).creditsBackend).toBe("store");
    expect(loadConfig({ ...mongo, ...redis }).creditsFlushMs).toBe(1000);
  });

  it("refuses the redis backend without Redis or without MongoDB, naming the variables", () => {
    expect(() => loadConfig({ ...mongo, LATCHKEY_CREDITS_BACKEND: "redis" })).toThrow(/LATCHKEY_REDIS_URL is required when LATCHKEY_CREDITS_BACKEND=redis/);
    expect(() => loadConfig({ ...redis, LATCHKEY_CREDITS_BACKEND: "redis" })).toThrow(/LATCHKEY_CREDITS_BACKEND=redis needs the mongodb store/);
    expect(() => loadConfig({ ...mongo, LATCHKEY_CREDITS_BACKEND: "lua" })).toThrow(ConfigError);
    expect(() => loadConfig({ ...mongo, LATCHKEY_CREDITS_BACKEND: "lua" })).toThrow(/LATCHKEY_CREDITS_BACKEND must be store or redis/);
  });

  it("takes a write-back interval of 50 ms to 60 s", () => {
    expect(loadConfig({ ...mongo, ...redis, LATCHKEY_CREDITS_FLUSH_MS: "250" }).creditsFlushMs).toBe(250);
    expect(() => loadConfig({ LATCHKEY_CREDITS_FLUSH_MS: "10" })).toThrow(/LATCHKEY_CREDITS_FLUSH_MS must be at least 50/);
    expect(() => loadConfig({ LATCHKEY_CREDITS_FLUSH_MS: "soon" })).toThrow(/LATCHKEY_CREDITS_FLUSH_MS must be a number/);
  });

  it("takes an outage credit allowance of 0 (refuse) or more, with the store backend only, naming the variable", () => {
    expect(loadConfig({ ...mongo }).outageCreditAllowance).toBe(0);
    expect(loadConfig({ ...mongo, LATCHKEY_OUTAGE_CREDIT_ALLOWANCE: "50" }).outageCreditAllowance).toBe(50);
    expect(loadConfig({ ...mongo, ...redis, LATCHKEY_CREDITS_BACKEND: "store", LATCHKEY_OUTAGE_CREDIT_ALLOWANCE: "50" }).outageCreditAllowance).toBe(50);
    expect(() => loadConfig({ LATCHKEY_OUTAGE_CREDIT_ALLOWANCE: "-1" })).toThrow(/LATCHKEY_OUTAGE_CREDIT_ALLOWANCE must be at least 0/);
    expect(() => loadConfig({ LATCHKEY_OUTAGE_CREDIT_ALLOWANCE: "1.5" })).toThrow(/LATCHKEY_OUTAGE_CREDIT_ALLOWANCE must be a whole number/);
    expect(() => loadConfig({ LATCHKEY_OUTAGE_CREDIT_ALLOWANCE: "lots" })).toThrow(/LATCHKEY_OUTAGE_CREDIT_ALLOWANCE must be a number/);
    expect(() => loadConfig({ LATCHKEY_OUTAGE_CREDIT_ALLOWANCE: "" })).toThrow(/LATCHKEY_OUTAGE_CREDIT_ALLOWANCE must be a number/);
    // The redis backend spends exactly through an outage: an allowance there is a mistake, not ignored.
    expect(() => loadConfig({ ...mongo, ...redis, LATCHKEY_OUTAGE_CREDIT_ALLOWANCE: "50" })).toThrow(/LATCHKEY_OUTAGE_CREDIT_ALLOWANCE applies to the store credits backend only/);
  });
});
