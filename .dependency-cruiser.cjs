/**
 * Latchkey's layering, checked by dependency-cruiser (`npm run depcruise`, run
 * by .ci/run right after `buf lint`). This file is the source of the rules; the
 * README's "Architecture" section draws them.
 *
 *   main.ts, cli.ts ─► app/ (composition root: the only place that names
 *                            concrete stores, counters, caches)
 *   server/ (transport) ─► rpc/ (protobuf ⇄ domain) ─► domain/ (rules + ports)
 *   storage/, cache/, ratelimit/, usage/ (adapters) ─► domain/ (its ports)
 *   observability/, config/: importable by every layer; they import no layer.
 *
 * Type-only imports count (tsPreCompilationDeps): a port is a dependency even
 * when it vanishes from the JavaScript. A cruise that finds no module fails
 * (.ci/run checks the count), so a parser that cannot read TypeScript does not
 * pass as "no violations".
 */
const ADAPTERS = "^src/(storage|cache|ratelimit|usage)/";
const ROOT = "^src/(app/|main\\.ts$|cli\\.ts$)";

/** @type {import('dependency-cruiser').IConfiguration} */
module.exports = {
  forbidden: [
    {
      name: "no-circular",
      severity: "error",
      comment: "A cycle means two modules are one; split out what both need (a port in domain/, a type in observability/).",
      from: {},
      to: { circular: true },
    },
    {
      name: "no-orphans",
      severity: "error",
      comment: "A module nothing imports and that imports nothing is dead code (worker entry points are loaded by path, and import what they share).",
      from: { orphan: true, path: "^src/" },
      to: {},
    },
    {
      name: "domain-imports-only-domain",
      severity: "error",
      comment:
        "The domain (rules and the ports it declares) imports the domain, observability interfaces and Node built-ins: no adapter, no transport, no generated code, no library.",
      from: { path: "^src/domain/" },
      to: { pathNot: ["^src/domain/", "^src/observability/"], dependencyTypesNot: ["core"] },
    },
    {
      name: "rpc-imports-inward",
      severity: "error",
      comment: "The RPC layer translates protobuf ⇄ domain: it calls the domain, never an adapter, the transport or the composition root.",
      from: { path: "^src/rpc/" },
      to: { path: ["^src/(app|server)/", ADAPTERS, "^src/(main|cli)\\.ts$"] },
    },
    {
      name: "server-is-transport",
      severity: "error",
      comment: "The transport (HTTP/2, HTTP/1.1, the lean gRPC path, routes) reaches the domain through rpc/; it knows no adapter.",
      from: { path: "^src/server/" },
      to: { path: ["^src/app/", ADAPTERS, "^src/(main|cli)\\.ts$"] },
    },
    {
      name: "server-reaches-domain-through-rpc",
      severity: "error",
      comment: "The transport calls no domain code; it may name domain types (routes.ts hands the use cases to the rpc/ service factories).",
      from: { path: "^src/server/" },
      to: { path: "^src/domain/", dependencyTypesNot: ["type-only"] },
    },
    {
      name: "adapters-import-inward",
      severity: "error",
      comment: "Adapters implement the domain's ports: they import the domain, never rpc/, server/, app/ or generated protobuf code.",
      from: { path: ADAPTERS },
      to: { path: ["^src/(app|server|rpc)/", "^gen/", "^src/(main|cli)\\.ts$"] },
    },
    {
      name: "adapters-independent",
      severity: "error",
      comment: "One adapter does not use another (storage/ does not know the cache, the cache does not know storage): they meet in app/.",
      from: { path: "^src/(storage|cache|ratelimit|usage)/" },
      to: { path: ADAPTERS, pathNot: "^src/$1/" },
    },
    {
      name: "observability-and-config-are-leaves",
      severity: "error",
      comment: "Everything may import the logger, the metrics and the configuration, so they import no other layer.",
      from: { path: "^src/(observability|config)/" },
      to: { path: "^src/", pathNot: "^src/$1/" },
    },
    {
      name: "composition-root-on-top",
      severity: "error",
      comment: "Only the entry points use the composition root; nothing below it picks a concrete class.",
      from: { pathNot: ROOT },
      to: { path: ROOT },
    },
  ],
  options: {
    doNotFollow: { path: ["node_modules", "^gen/"] },
    // TypeScript 7 (the native compiler) has no JavaScript API for dependency-cruiser
    // to parse with; swc parses the sources and keeps `import type` (as "type-only").
    parser: "swc",
    tsPreCompilationDeps: true,
    enhancedResolveOptions: { exportsFields: ["exports"], conditionNames: ["import", "require", "node", "default", "types"], extensions: [".ts", ".js"] },
    reporterOptions: { text: { highlightFocused: true } },
  },
};
