/**
 * Typed domain errors. The RPC layer maps each to one status code (see
 * src/rpc/interceptors.ts); anything else becomes INTERNAL.
 */
export class DomainError extends Error {
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

/** Bad input. `field` names the offending request field (dotted path). */
export class InvalidArgumentError extends DomainError {
  constructor(
    readonly field: string,
    readonly reason: string,
  ) {
    super(`${field}: ${reason}`);
  }
}

export class NotFoundError extends DomainError {}
export class AlreadyExistsError extends DomainError {}
export class FailedPreconditionError extends DomainError {}
export class UnauthenticatedError extends DomainError {}
export class PermissionDeniedError extends DomainError {}
/** A per-process budget is spent (e.g. lookups of unknown root keys); retrying shortly may help. */
export class ResourceExhaustedError extends DomainError {}
/** The store (or another dependency) cannot be reached; retrying may help. */
export class UnavailableError extends DomainError {}
/**
 * The store itself could not be reached — connection refused or lost, no
 * server, an I/O failure — as opposed to contention (a busy lock). The store
 * guard (src/storage/store-guard.ts) probes the store on it, and the caches
 * may answer from what they hold (README, "Store outages").
 */
export class StoreUnreachableError extends UnavailableError {}
/** The call's deadline passed before it was done. */
export class DeadlineExceededError extends DomainError {}
/** The client cancelled the call before it was done. */
export class CanceledError extends DomainError {}
