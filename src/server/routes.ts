import type { ConnectRouter } from "@connectrpc/connect";
import { Health } from "../../gen/grpc/health/v1/health_pb.js";
import * as reflectionV1 from "../../gen/grpc/reflection/v1/reflection_pb.js";
import * as reflectionV1alpha from "../../gen/grpc/reflection/v1alpha/reflection_pb.js";
import { IdentityService, file_latchkey_v1_identity_service } from "../../gen/latchkey/v1/identity_service_pb.js";
import { KeyService, file_latchkey_v1_key_service } from "../../gen/latchkey/v1/key_service_pb.js";
import { file_grpc_health_v1_health } from "../../gen/grpc/health/v1/health_pb.js";
import type { IdentityManager } from "../domain/identities.js";
import type { KeyManager } from "../domain/keys.js";
import type { Verifier } from "../domain/verify.js";
import { createHealthService, type HealthState } from "../rpc/health.js";
import { createIdentityService } from "../rpc/identity-service.js";
import { createKeyService } from "../rpc/key-service.js";
import { createReflectionServices } from "../rpc/reflection.js";

export interface RouteDeps {
  identities: IdentityManager;
  keys: KeyManager;
  verify: Verifier;
  health: HealthState;
}

/** Every service the server answers, on one router. */
export function createRoutes(deps: RouteDeps) {
  const reflection = createReflectionServices(
    [file_latchkey_v1_identity_service, file_latchkey_v1_key_service, file_grpc_health_v1_health, reflectionV1.file_grpc_reflection_v1_reflection, reflectionV1alpha.file_grpc_reflection_v1alpha_reflection],
    [IdentityService.typeName, KeyService.typeName, Health.typeName, reflectionV1.ServerReflection.typeName, reflectionV1alpha.ServerReflection.typeName],
  );
  return (router: ConnectRouter) => {
    router.service(IdentityService, createIdentityService({ identities: deps.identities }));
    router.service(KeyService, createKeyService({ keys: deps.keys, verify: deps.verify }));
    router.service(Health, createHealthService(deps.health));
    router.service(reflectionV1.ServerReflection, reflection.v1);
    router.service(reflectionV1alpha.ServerReflection, reflection.v1alpha);
  };
}
