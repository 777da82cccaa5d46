import { createRegistry, toBinary, type DescFile, type Registry } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import type { ServiceImpl } from "@connectrpc/connect";
import * as v1 from "../../gen/grpc/reflection/v1/reflection_pb.js";
import * as v1alpha from "../../gen/grpc/reflection/v1alpha/reflection_pb.js";

type Request = v1.ServerReflectionRequest;
type ResponseInit = {
  validHost: string;
  originalRequest: Request;
  messageResponse:
    | { case: "fileDescriptorResponse"; value: { fileDescriptorProto: Uint8Array[] } }
    | { case: "listServicesResponse"; value: { service: { name: string }[] } }
    | { case: "allExtensionNumbersResponse"; value: { baseTypeName: string; extensionNumber: number[] } }
    | { case: "errorResponse"; value: { errorCode: number; errorMessage: string } };
};

const NOT_FOUND = 5;

/** The file and every file it imports, transitively, dependencies first. */
function withDependencies(file: DescFile, seen = new Set<string>(), out: DescFile[] = []): DescFile[] {
  if (seen.has(file.name)) return out;
  seen.add(file.name);
  for (const dep of file.dependencies) withDependencies(dep, seen, out);
  out.push(file);
  return out;
}

/** Answers one reflection request from the registry of served files. */
function answer(registry: Registry, byName: Map<string, DescFile>, services: string[], req: Request): ResponseInit {
  const base = { validHost: req.host, originalRequest: req };
  const files = (file: DescFile | undefined, what: string): ResponseInit =>
    file
      ? {
          ...base,
          messageResponse: {
            case: "fileDescriptorResponse",
            value: { fileDescriptorProto: withDependencies(file).map((f) => toBinary(FileDescriptorProtoSchema, f.proto)) },
          },
        }
      : { ...base, messageResponse: { case: "errorResponse", value: { errorCode: NOT_FOUND, errorMessage: `${what} not found` } } };
  const r = req.messageRequest;
  switch (r.case) {
    case "listServices":
      return { ...base, messageResponse: { case: "listServicesResponse", value: { service: services.map((name) => ({ name })) } } };
    case "fileByFilename":
      return files(byName.get(r.value), `file ${r.value}`);
    case "fileContainingSymbol": {
      // A symbol is a type, a service, or a method / field / enum value inside one.
      const sym = r.value.replace(/^\./, "");
      const desc = registry.get(sym) ?? registry.get(sym.slice(0, Math.max(0, sym.lastIndexOf("."))));
      return files(desc?.file, `symbol ${r.value}`);
    }
    case "fileContainingExtension": {
      const msg = registry.getMessage(r.value.containingType);
      const ext = msg ? registry.getExtensionFor(msg, r.value.extensionNumber) : undefined;
      return files(ext?.file, `extension ${r.value.containingType}(${r.value.extensionNumber})`);
    }
    case "allExtensionNumbersOfType": {
      const msg = registry.getMessage(r.value);
      if (!msg) return files(undefined, `type ${r.value}`);
      const numbers: number[] = [];
      for (const t of registry) if (t.kind === "extension" && t.extendee.typeName === msg.typeName) numbers.push(t.number);
      return { ...base, messageResponse: { case: "allExtensionNumbersResponse", value: { baseTypeName: msg.typeName, extensionNumber: numbers } } };
    }
    default:
      return { ...base, messageResponse: { case: "errorResponse", value: { errorCode: 3, errorMessage: "empty request" } } };
  }
}

/**
 * gRPC server reflection, v1 and v1alpha, over the given files, so buf curl,
 * grpcurl and Postman can call the server with no proto files at hand.
 */
export function createReflectionServices(files: DescFile[], services: string[]) {
  const all = new Map(files.flatMap((f) => withDependencies(f)).map((f) => [f.name, f]));
  const registry = createRegistry(...all.values());
  const impl = {
    async *serverReflectionInfo(reqs: AsyncIterable<Request>) {
      for await (const req of reqs) yield answer(registry, all, services, req);
    },
  };
  return {
    v1: impl as unknown as ServiceImpl<typeof v1.ServerReflection>,
    v1alpha: impl as unknown as ServiceImpl<typeof v1alpha.ServerReflection>,
  };
}
