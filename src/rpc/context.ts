import { createContextKey, type HandlerContext } from "@connectrpc/connect";
import type { Principal } from "../domain/access.js";

/** The authenticated caller, set by the auth interceptor. */
export const principalKey = createContextKey<Principal | null>(null, { description: "authenticated root key" });
/** Request id for logs: the caller's `x-request-id`, or a generated one. */
export const requestIdKey = createContextKey<string>("", { description: "request id" });

export function principalOf(ctx: HandlerContext): Principal {
  const p = ctx.values.get(principalKey);
  // The auth interceptor runs before every handler that reaches here.
  if (!p) throw new Error("no principal in context: auth interceptor missing");
  return p;
}
