/**
 * Which store errors mean "the store cannot be reached" (StoreUnreachableError:
 * UNAVAILABLE, and the store guard probes the store) and which mean "not now"
 * (UnavailableError). Found killing FerretDB under load: a call waiting for a
 * pooled connection when the pool was cleared got the driver's
 * `PoolClearedOnNetworkError`, which the store did not recognise by its name,
 * so the client got INTERNAL.
 */
import { MongoNetworkError } from "mongodb";
import { afterEach, describe, expect, it } from "vitest";
import { StoreUnreachableError, UnavailableError } from "../../src/domain/errors.js";
import { asStoreError } from "../../src/storage/embedded/sqlite-errors.js";
import { openTestStore, type TestStore } from "../support/harness.js";
import { describeWith, mongodbUri } from "../verify/support.js";

/** The driver's error for an operation that waited for a connection of a pool cleared after a network error. */
class PoolClearedOnNetworkError extends MongoNetworkError {
  override get name(): string {
    return "PoolClearedOnNetworkError";
  }
}

describeWith("MONGODB_URI", mongodbUri(), "MongoDB errors", () => {
  let ts: TestStore | undefined;
  afterEach(async () => {
    await ts?.destroy();
    ts = undefined;
  });

  it("reports a cleared connection pool as an unreachable store (UNAVAILABLE), not an internal error", async () => {
    ts = await openTestStore("mongodb");
    const poolCleared = (coll: object) =>
      new Proxy(coll, {
        get(target, prop) {
          if (prop === "findOne") return () => Promise.reject(new PoolClearedOnNetworkError("Connection to 127.0.0.1:27017 interrupted due to server monitor timeout"));
          return Reflect.get(target, prop, target);
        },
      });
    // What a lookup by hash reads: `keys`, or on FerretDB's bucketed layout one find command in a bucket (docs/storage-layout.md).
    const fields = ts.store as unknown as { layout: string; keys: object; buckets: { findByHash: (hash: string) => Promise<unknown> } };
    const { keys, buckets } = fields;
    const findByHash = buckets?.findByHash;
    if (fields.layout === "bucketed") buckets.findByHash = () => Promise.reject(new PoolClearedOnNetworkError("Connection to 127.0.0.1:27017 interrupted due to server monitor timeout"));
    else fields.keys = poolCleared(keys);
    try {
      await expect(ts.store.getKeyByHash("0".repeat(64))).rejects.toBeInstanceOf(StoreUnreachableError);
    } finally {
      fields.keys = keys;
      if (buckets) buckets.findByHash = findByHash;
    }
  });
});

describe("SQLite errors", () => {
  const sqlite = (code: string) => asStoreError(Object.assign(new Error(code), { code }));

  it("reports I/O errors and a database that cannot be opened as an unreachable store", () => {
    for (const code of ["SQLITE_IOERR", "SQLITE_IOERR_WRITE", "SQLITE_IOERR_FSYNC", "SQLITE_CANTOPEN"]) expect(sqlite(code), code).toBeInstanceOf(StoreUnreachableError);
  });

  it("reports a busy, full or read-only database as UNAVAILABLE for now, not as unreachable", () => {
    for (const code of ["SQLITE_BUSY", "SQLITE_FULL", "SQLITE_READONLY", "SQLITE_READONLY_DBMOVED"]) {
      const err = sqlite(code);
      expect(err, code).toBeInstanceOf(UnavailableError);
      expect(err, code).not.toBeInstanceOf(StoreUnreachableError);
    }
  });

  it("passes other errors on unchanged", () => {
    expect(sqlite("SQLITE_CONSTRAINT_CHECK")).not.toBeInstanceOf(UnavailableError);
  });
});
