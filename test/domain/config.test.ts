import { describe, expect, it } from "vitest";
import { ConfigError, SETTINGS, loadConfig } from "../../src/config/config.js";

/** The error loadConfig throws for this environment and these flags. */
function configError(env: Record<string, string>, argv: string[] = []): ConfigError {
  try {
    loadConfig(env, argv);
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return err as ConfigError;
  }
  throw new Error("expected loadConfig to fail");
}

const NUMERIC = Object.values(SETTINGS)
  .filter((s) => /^\d+$/.test(s.default))
  .map((s) => s.env);

describe("configuration", () => {
  it("starts from documented defaults with an empty environment", () => {
    const config = loadConfig({}, []);
    expect(config).toMatchObject({ host: "127.0.0.1", port: 8080, metricsPort: 9464, store: "embedded", dataDir: "./data", mongodbUri: null, tls: null });
    expect(Object.isFrozen(config)).toBe(true);
  });

  it("reads every setting from its environment variable", () => {
    const config = loadConfig({
      LATCHKEY_HOST: "0.0.0.0",
      LATCHKEY_PORT: "9000",
      LATCHKEY_METRICS_PORT: "0",
      LATCHKEY_LOG_LEVEL: "debug",
      LATCHKEY_ROOT_KEY_CACHE_MS: "250",
      MONGODB_URI: "mongodb://db:27017",
      LATCHKEY_MONGODB_DATABASE: "lk_prod",
    });
    expect(config).toMatchObject({
      host: "0.0.0.0",
      port: 9000,
      metricsPort: 0,
      logLevel: "debug",
      rootKeyCacheMs: 250,
      mongodbUri: "mongodb://db:27017",
      mongodbDatabase: "lk_prod",
    });
  });

  it("picks the mongodb store when MONGODB_URI is set, unless told otherwise", () => {
    expect(loadConfig({ MONGODB_URI: "mongodb://db:27017" }).store).toBe("mongodb");
    expect(loadConfig({ MONGODB_URI: "mongodb://db:27017", LATCHKEY_STORE: "embedded" }).store).toBe("embedded");
  });

  describe("flags", () => {
    it("override environment variables, as --name=value and --name value", () => {
      const config = loadConfig({ LATCHKEY_PORT: "8000", LATCHKEY_METRICS_PORT: "9000", LATCHKEY_LOG_LEVEL: "warn" }, [
        "--port=7000",
        "--metrics-port",
        "0",
        "--log-level=error",
      ]);
      expect(config).toMatchObject({ port: 7000, metricsPort: 0, logLevel: "error" });
    });

    it("keep everything after the first = in the value", () => {
      expect(loadConfig({}, ["--mongodb-uri=mongodb://u:p@db/?a=b"]).mongodbUri).toBe("mongodb://u:p@db/?a=b");
    });

    it("refuse an unknown flag, naming it", () => {
      expect(configError({}, ["--prot=1"]).message).toContain("--prot");
    });

    it("refuse a flag without a value", () => {
      expect(configError({}, ["--port"]).message).toContain("--port");
    });

    it("are validated like environment variables", () => {
      expect(configError({ LATCHKEY_PORT: "8080" }, ["--port=http"]).message).toContain("LATCHKEY_PORT");
    });
  });

  describe("fails fast, naming the variable,", () => {
    it.each(NUMERIC)("when %s is not a number", (name) => {
      expect(configError({ [name]: "ten" }).message).toContain(name);
    });

    it.each(NUMERIC)("when %s is empty", (name) => {
      expect(configError({ [name]: "" }).message).toContain(name);
    });

    it.each([
      ["LATCHKEY_PORT", "65536"],
      ["LATCHKEY_PORT", "-1"],
      ["LATCHKEY_PORT", "80.5"],
      ["LATCHKEY_METRICS_PORT", "70000"],
      ["LATCHKEY_HEALTH_CHECK_INTERVAL_MS", "10"],
      ["LATCHKEY_SHUTDOWN_GRACE_MS", "-5"],
      ["LATCHKEY_STORE", "postgres"],
      ["LATCHKEY_LOG_LEVEL", "verbose"],
      ["LATCHKEY_HOST", ""],
      ["LATCHKEY_DATA_DIR", ""],
      ["MONGODB_URI", "http://db:27017"],
      ["LATCHKEY_MONGODB_DATABASE", "has space"],
      ["LATCHKEY_MONGODB_DATABASE", "x".repeat(64)],
      ["LATCHKEY_RATELIMIT_LEASE_MAX", "-1"],
      ["LATCHKEY_RATELIMIT_LEASE_MAX", "2.5"],
      ["LATCHKEY_RATELIMIT_LEASE_MAX", "1000000001"],
      ["LATCHKEY_CREDITS_LEASE_MAX", "-1"],
      ["LATCHKEY_CREDITS_LEASE_MAX", "2.5"],
      ["LATCHKEY_CREDITS_LEASE_MAX", "1000000001"],
    ])("when %s is %j", (name, value) => {
      expect(configError({ [name]: value }).message).toContain(name);
    });

    it("when the mongodb store has no MONGODB_URI", () => {
      expect(configError({ LATCHKEY_STORE: "mongodb" }).message).toContain("MONGODB_URI");
    });

    it("when only one of the TLS files is set", () => {
      expect(configError({ LATCHKEY_TLS_CERT: "/tls/cert.pem" }).message).toContain("LATCHKEY_TLS_KEY");
      expect(configError({ LATCHKEY_TLS_KEY: "/tls/key.pem" }).message).toContain("LATCHKEY_TLS_CERT");
    });

    it("listing every bad variable at once", () => {
      const message = configError({ LATCHKEY_PORT: "x", LATCHKEY_LOG_LEVEL: "loud", LATCHKEY_STORE: "redis" }).message;
      for (const name of ["LATCHKEY_PORT", "LATCHKEY_LOG_LEVEL", "LATCHKEY_STORE"]) expect(message).toContain(name);
    });
  });
});
