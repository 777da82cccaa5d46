import type { DescService } from "@bufbuild/protobuf";
import type { ConnectRouter, ServiceImpl } from "@connectrpc/connect";
import { Health } from "../../gen/grpc/health/v1/health_pb.js";
import * as reflectionV1 from "../../gen/grpc/reflection/v1/reflection_pb.js";
import * as reflectionV1alpha from "../../gen/grpc/reflection/v1alpha/reflection_pb.js";
import { IdentityService, file_latchkey_v1_identity_service } from "../../gen/latchkey/v1/identity_service_pb.js";
import { KeyService, file_latchkey_v1_key_service } from "../../gen/latchkey/v1/key_service_pb.js";
import { file_grpc_health_v1_health } from "../../gen/grpc/health/v1/health_pb.js";
import type { IdentityManager } from "../domain/identities.js";
import type { KeyManager } from "../domain/keys.js";
import type { Verifier } from "../domain/verify.js";
import type { UsageReader } from "../domain/usage-reader.js";
import { createHealthService, type HealthState } from "../rpc/health.js";
import { createIdentityService } from "../rpc/identity-service.js";
import { createKeyService } from "../rpc/key-service.js";
import { createReflectionServices } from "../rpc/reflection.js";
import type { ServiceRegistration } from "./grpc-unary.js";

export interface RouteDeps {
  identities: IdentityManager;
  keys: KeyManager;
  verify: Verifier;
  usage: UsageReader;
  health: HealthState;
}

/**
 * Every service the server answers, with its implementation. The same
 * registrations feed the Connect router (every protocol) and the unary gRPC
 * fast path (src/server/grpc-unary.ts).
 */
export function createServiceRegistrations(deps: RouteDeps): ServiceRegistration[] {
  const reflection = createReflectionServices(
    [file_latchkey_v1_identity_service, file_latchkey_v1_key_service, file_grpc_health_v1_health, reflectionV1.file_grpc_reflection_v1_reflection, reflectionV1alpha.file_grpc_reflection_v1alpha_reflection],
    [IdentityService.typeName, KeyService.typeName, Health.typeName, reflectionV1.ServerReflection.typeName, reflectionV1alpha.ServerReflection.typeName],
  );
  return [
    register(IdentityService, createIdentityService({ identities: deps.identities, usage: deps.usage })),
    register(KeyService, createKeyService({ keys: deps.keys, verify: deps.verify, usage: deps.usage })),
    register(Health, createHealthService(deps.health)),
    register(reflectionV1.ServerReflection, reflection.v1),
    register(reflectionV1alpha.ServerReflection, reflection.v1alpha),
  ];
}

/** One registration. `impl` must implement every RPC of `service`: a missing one does not compile. */
export function register<S extends DescService>(service: S, impl: ServiceImpl<S>): ServiceRegistration {
  return { service, impl: impl as unknown as ServiceRegistration["impl"] };
}

/** The Connect routes function over the registrations. */
export function routesOf(registrations: ServiceRegistration[]) {
  return (router: ConnectRouter) => {
    for (const r of registrations) router.service(r.service, r.impl);
  };
}

/** Every service, on one router. */
export function createRoutes(deps: RouteDeps) {
  return routesOf(createServiceRegistrations(deps));
}
