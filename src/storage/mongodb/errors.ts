import { MongoNetworkError, MongoServerError, MongoServerSelectionError } from "mongodb";
import { AlreadyExistsError, StoreUnreachableError } from "../../domain/errors.js";

export const UNAVAILABLE = new Set([
  "MongoNetworkError",
  "MongoNetworkTimeoutError",
  "MongoServerSelectionError",
  "MongoNotConnectedError",
  "MongoTopologyClosedError",
  "MongoPoolClearedError",
  "MongoServerClosedError",
  "MongoPoolClosedError",
]);

/**
 * The server could not be reached. By class as well as by name: the driver's
 * network errors have subclasses named otherwise (an operation waiting for a
 * connection when the pool is cleared after another one lost its connection
 * gets a `PoolClearedOnNetworkError`).
 */
export function isUnreachable(err: unknown): err is Error {
  return err instanceof MongoNetworkError || err instanceof MongoServerSelectionError || (err instanceof Error && UNAVAILABLE.has(err.name));
}

/**
 * A unique index refused the write. FerretDB (SQLite backend) reports a
 * violation by an update as code 1 with SQLite's message instead of 11000.
 */
export function isDuplicateKey(err: unknown): err is MongoServerError {
  return err instanceof MongoServerError && isDuplicateCode(err.code, err.message);
}

export function isDuplicateCode(code: unknown, message: string | undefined): boolean {
  return code === 11000 || (code === 1 && /UNIQUE constraint failed/.test(message ?? ""));
}

/** Runs a driver call, turning driver errors into domain errors. */
export async function runMapped<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    if (isDuplicateKey(err)) {
      const msg = String(err.message);
      throw new AlreadyExistsError(/externalId|external_id/.test(msg) ? "an identity with this external_id already exists" : "already exists");
    }
    // Says nothing of whether a write was applied: a connection lost after sending leaves it unknown.
    if (isUnreachable(err)) throw new StoreUnreachableError(`mongodb: ${err.name}`);
    throw err;
  }
}
