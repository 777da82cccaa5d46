import { createContextKey, type HandlerContext } from "@connectrpc/connect";
import type { Principal } from "../domain/access.js";
import type { LazyCallSignal } from "../domain/verify.js";

/** The authenticated caller, set by the auth interceptor. */
export const principalKey = createContextKey<Principal | null>(null, { description: "authenticated root key" });

/**
 * Set by the lean gRPC path: the call's state, cheaper to ask than ctx.signal,
 * which that path makes only when it is read (src/server/grpc-unary.ts).
 */
export const callSignalKey = createContextKey<LazyCallSignal | null>(null, { description: "the call's state, without an AbortSignal" });

export function principalOf(ctx: HandlerContext): Principal {
  const p = ctx.values.get(principalKey);
  // The auth interceptor runs before every handler that reaches here.
  if (!p) throw new Error("no principal in context: auth interceptor missing");
  return p;
}
