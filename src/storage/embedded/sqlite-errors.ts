import { StoreUnreachableError, UnavailableError } from "../../domain/errors.js";

/**
 * A SQLite error the client may retry becomes UNAVAILABLE: an I/O error or a
 * database that cannot be opened means the store cannot be reached
 * (StoreUnreachableError); busy, disk full or a read-only database, that it
 * cannot take this write now. Others pass unchanged.
 */
export function asStoreError(err: Error & { code?: string }): Error {
  const code = err.code ?? "";
  if (code.startsWith("SQLITE_IOERR") || code.startsWith("SQLITE_CANTOPEN")) return new StoreUnreachableError(`embedded store: ${code}`);
  if (code === "SQLITE_BUSY" || code === "SQLITE_FULL" || code.startsWith("SQLITE_READONLY")) return new UnavailableError(`embedded store: ${code}`);
  return err;
}
