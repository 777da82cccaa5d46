import type { ServiceImpl } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { IdentityService } from "../../gen/latchkey/v1/identity_service_pb.js";
import { KeyService } from "../../gen/latchkey/v1/key_service_pb.js";
import type { IdentityManager } from "../../src/domain/identities.js";
import type { KeyManager } from "../../src/domain/keys.js";
import type { UsageReader } from "../../src/domain/usage-reader.js";
import type { Verifier } from "../../src/domain/verify.js";
import { createIdentityService } from "../../src/rpc/identity-service.js";
import { createKeyService } from "../../src/rpc/key-service.js";
import { register } from "../../src/server/routes.js";

/*
 * The service factories are typed as complete ServiceImpls, so an RPC added to
 * the proto without a handler is a compile error (`npm run typecheck`, which
 * `npm test` runs first), not an UNIMPLEMENTED answer found in production.
 */
const keyService: ServiceImpl<typeof KeyService> = createKeyService({
  keys: {} as KeyManager,
  verify: {} as Verifier,
  usage: {} as UsageReader,
});
const identityService: ServiceImpl<typeof IdentityService> = createIdentityService({
  identities: {} as IdentityManager,
  usage: {} as UsageReader,
});

describe("service implementations", () => {
  it("refuses, at compile time, a registration that leaves out an RPC", () => {
    const { verifyKey } = keyService;
    // @ts-expect-error every other KeyService RPC is missing
    const partial = () => register(KeyService, { verifyKey });
    expect(typeof partial).toBe("function");
  });

  it("answers every RPC of KeyService and IdentityService with a handler", () => {
    for (const [service, impl] of [
      [KeyService, keyService],
      [IdentityService, identityService],
    ] as const) {
      const missing = service.methods.filter((m) => typeof (impl as Record<string, unknown>)[m.localName] !== "function").map((m) => m.name);
      expect(missing, service.typeName).toEqual([]);
    }
  });
});
