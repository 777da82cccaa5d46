import { UnavailableError } from "../../domain/errors.js";

/** A SQLite error the client may retry (busy, I/O, disk full, cannot open) becomes UNAVAILABLE; others pass unchanged. */
export function asStoreError(err: Error & { code?: string }): Error {
  const code = err.code ?? "";
  if (code === "SQLITE_BUSY" || code.startsWith("SQLITE_IOERR") || code === "SQLITE_FULL" || code.startsWith("SQLITE_CANTOPEN")) {
    return new UnavailableError(`embedded store: ${code}`);
  }
  return err;
}
