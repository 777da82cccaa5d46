import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import { randomBytes } from "node:crypto";
import {
  AlreadyExistsError,
  CanceledError,
  DeadlineExceededError,
  DomainError,
  FailedPreconditionError,
  InvalidArgumentError,
  NotFoundError,
  PermissionDeniedError,
  ResourceExhaustedError,
  UnauthenticatedError,
  UnavailableError,
} from "../domain/errors.js";
import type { RootKeyAuthenticator } from "../domain/root-keys.js";
import type { Logger } from "../observability/logger.js";
import { fastSeries, type Metrics } from "../observability/metrics.js";
import { principalKey } from "./context.js";
import { badRequestDetail } from "./status-details.js";

// Request ids for log lines: the caller's `x-request-id`, else a per-process random
// prefix and a counter — made only when a line is logged, not for every call.
const ID_PREFIX = randomBytes(6).toString("hex");
let idCounter = 0;
const requestIdOf = (header: Headers) => header.get("x-request-id")?.slice(0, 128) || `${ID_PREFIX}-${(++idCounter).toString(36)}`;

/** Services that answer without a root key. */
const PUBLIC_SERVICES = new Set(["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"]);

const CODES: [new (...args: never[]) => DomainError, Code][] = [
  [InvalidArgumentError, Code.InvalidArgument],
  [NotFoundError, Code.NotFound],
  [AlreadyExistsError, Code.AlreadyExists],
  [FailedPreconditionError, Code.FailedPrecondition],
  [UnauthenticatedError, Code.Unauthenticated],
  [PermissionDeniedError, Code.PermissionDenied],
  [UnavailableError, Code.Unavailable],
  [ResourceExhaustedError, Code.ResourceExhausted],
  [DeadlineExceededError, Code.DeadlineExceeded],
  [CanceledError, Code.Canceled],
];

/** Maps an error to the ConnectError the client sees. Unknown errors leak nothing. */
export function toConnectError(err: unknown): { error: ConnectError; internal: boolean } {
  if (err instanceof ConnectError) return { error: err, internal: err.code === Code.Internal || err.code === Code.Unknown };
  // Field violations travel as google.rpc.BadRequest details, readable by generated clients.
  if (err instanceof InvalidArgumentError) {
    return { error: new ConnectError(err.message, Code.InvalidArgument, undefined, [badRequestDetail(err.field, err.reason)]), internal: false };
  }
  for (const [type, code] of CODES) {
    if (err instanceof type) return { error: new ConnectError(err.message, code), internal: false };
  }
  return { error: new ConnectError("internal error", Code.Internal), internal: true };
}

/**
 * Outermost: domain-error mapping, logging (with a request id) and metrics. Unknown
 * errors become INTERNAL with a generic message and are logged with the request id.
 */
export function createObservabilityInterceptor(deps: { logger: Logger; metrics: Metrics }): Interceptor {
  // Per method and code, the series: counted in a plain number (metrics.ts, fastSeries), and the histogram's child.
  type Series = { requests: { inc(): void }; duration: { observe(v: number): void } };
  const byMethod = new Map<object, { name: string; codes: Map<string, Series> }>();
  const seriesOf = (m: { name: string; codes: Map<string, Series> }, code: string): Series => {
    let s = m.codes.get(code);
    if (!s) {
      s = { requests: fastSeries(deps.metrics.rpcRequests, { method: m.name, code }), duration: deps.metrics.rpcDuration.labels({ method: m.name, code }) };
      m.codes.set(code, s);
    }
    return s;
  };
  return (next) => async (req) => {
    const started = performance.now();
    let m = byMethod.get(req.method);
    if (!m) byMethod.set(req.method, (m = { name: `${req.service.typeName}/${req.method.name}`, codes: new Map() }));
    const method = m.name;
    let code = "ok";
    // Made for the first log line of the call, and the same for every line after it.
    let requestId: string | undefined;
    try {
      return await next(req);
    } catch (err) {
      const { error, internal } = toConnectError(err);
      code = Code[error.code];
      if (internal) deps.logger.error({ requestId: (requestId = requestIdOf(req.header)), method, err }, "internal error");
      else if (error.code === Code.Unavailable) deps.logger.warn({ requestId: (requestId = requestIdOf(req.header)), method, reason: error.rawMessage }, "unavailable");
      throw error;
    } finally {
      const seconds = (performance.now() - started) / 1000;
      const series = seriesOf(m, code);
      series.requests.inc();
      series.duration.observe(seconds);
      if (deps.logger.isLevelEnabled("debug")) deps.logger.debug({ requestId: requestId ?? requestIdOf(req.header), method, code, ms: seconds * 1000 }, "rpc");
    }
  };
}

/**
 * Authenticates the root key of every call to a Latchkey service. A root key
 * the authenticator holds as checked (the usual case) is taken without a promise.
 */
export function createAuthInterceptor(authenticate: RootKeyAuthenticator): Interceptor {
  return (next) => (req) => {
    if (PUBLIC_SERVICES.has(req.service.typeName)) return next(req);
    const header = req.header.get("authorization");
    const principal = authenticate.cached(header);
    if (principal !== undefined) {
      req.contextValues.set(principalKey, principal);
      return next(req);
    }
    return authenticate(header).then((p) => {
      req.contextValues.set(principalKey, p);
      return next(req);
    });
  };
}
