/**
 * Integration tier: the built server process (`node dist/src/cli.js serve`) on
 * port 0, driven by the clients people really use against it: @grpc/grpc-js, a
 * Python grpcio client generated from proto/, buf curl, grpcurl,
 * grpc-health-probe, plain fetch (Connect over HTTP/1.1) and a Prometheus scrape.
 */
import * as grpc from "@grpc/grpc-js";
import { readdirSync } from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { IdentityService } from "../../gen/latchkey/v1/identity_service_pb.js";
import { KeyService } from "../../gen/latchkey/v1/key_service_pb.js";
import {
  dropMongoDatabase,
  findPython,
  findTool,
  grpcClients,
  grpcError,
  IN_CI,
  itWithTool,
  MONGODB_URI,
  PROTO_DIR,
  REPO,
  run,
  startServer,
  tempDir,
  uniqueName,
  type GrpcClients,
  type Msg,
  type ServerProcess,
} from "./support.js";

const BUF = path.join(REPO, "node_modules/.bin/buf");
const grpcurl = findTool("grpcurl");
const healthProbe = findTool("grpc-health-probe");
const python = findPython();

/** An external_id in one of the shapes the spec promises to accept, unique per call. */
function externalId(shape: "clerk" | "workos" | "auth0" | "google"): string {
  const u = uniqueName("x").replace(/_/g, "");
  return { clerk: `user_2NNEqL${u}`, workos: `org_01E4${u}`, auth0: `auth0|5f7c${u}`, google: `google-oauth2|${u}` }[shape];
}

/** Connect protocol, JSON codec, over HTTP/1.1 (Node's fetch): what a browser or curl sends. */
async function connectCall(server: ServerProcess, rpc: string, body: string, rootKey: string | null): Promise<{ status: number; json: Msg }> {
  const headers: Record<string, string> = { "content-type": "application/json" };
  if (rootKey) headers.authorization = `Bearer ${rootKey}`;
  const res = await fetch(`${server.baseUrl}/${rpc}`, { method: "POST", headers, body, signal: AbortSignal.timeout(10_000) });
  return { status: res.status, json: (await res.json()) as Msg };
}

describe("real clients against the server process (embedded store)", () => {
  let server: ServerProcess;
  let rootKey: string;
  let clients: GrpcClients;

  beforeAll(async () => {
    server = await startServer({ metrics: true });
    expect(server.bootstrapKey, "a fresh data dir prints the bootstrap root key").toMatch(/^lkroot_/);
    rootKey = server.bootstrapKey!;
    clients = grpcClients(server.address);
  });

  afterAll(async () => {
    clients?.close();
    if (server) expect(await server.stop()).toEqual({ code: 0, signal: null });
  });

  describe("@grpc/grpc-js", () => {
    it("creates an identity, a key linked by external_id, and reads the key back", async () => {
      const ext = externalId("clerk");
      const { identity } = await clients.call(
        clients.identities,
        "CreateIdentity",
        { external_id: ext, meta: { fields: { plan: { stringValue: "pro" } } } },
        rootKey,
      );
      expect(identity.id).toMatch(/^id_/);
      expect(identity.external_id).toBe(ext);
      expect(identity.meta.fields.plan.stringValue).toBe("pro");

      const created = await clients.call(clients.keys, "CreateKey", { api_id: "api_grpcjs", prefix: "sk", name: "primary", external_id: ext }, rootKey);
      expect(created.plaintext).toMatch(/^sk_[1-9A-HJ-NP-Za-km-z]+$/);
      expect(created.key.id).toMatch(/^key_/);
      expect(created.key.identity_id).toBe(identity.id);
      expect(created.key.external_id).toBe(ext);
      expect(created.plaintext.startsWith(created.key.start)).toBe(true);
      expect(created.key.start.length).toBeLessThan(created.plaintext.length);

      const { key } = await clients.call(clients.keys, "GetKey", { id: created.key.id }, rootKey);
      expect(key).toMatchObject({
        id: created.key.id,
        api_id: "api_grpcjs",
        name: "primary",
        identity_id: identity.id,
        external_id: ext,
        start: created.key.start,
        enabled: true,
      });
      expect(JSON.stringify(key)).not.toContain(created.plaintext);
    });

    it("creates the identity when a key names an unknown external_id", async () => {
      const ext = externalId("auth0");
      const created = await clients.call(clients.keys, "CreateKey", { api_id: "api_grpcjs", external_id: ext }, rootKey);
      const { identity } = await clients.call(clients.identities, "GetIdentity", { external_id: ext }, rootKey);
      expect(identity.external_id).toBe(ext);
      expect(created.key.identity_id).toBe(identity.id);
    });

    it("rejects a malformed external_id as INVALID_ARGUMENT naming the field, and stores nothing", async () => {
      const err = await grpcError(clients.call(clients.identities, "CreateIdentity", { external_id: "has spaces and $" }, rootKey));
      expect(err.code).toBe(grpc.status.INVALID_ARGUMENT);
      expect(err.details).toMatch(/^external_id\b/);

      const keyErr = await grpcError(clients.call(clients.keys, "CreateKey", { api_id: "bad api id!", external_id: externalId("workos") }, rootKey));
      expect(keyErr.code).toBe(grpc.status.INVALID_ARGUMENT);
      expect(keyErr.details).toMatch(/^api_id\b/);

      const missing = await grpcError(clients.call(clients.identities, "GetIdentity", { external_id: "has spaces and $" }, rootKey));
      expect(missing.code).toBe(grpc.status.INVALID_ARGUMENT);
    });

    it("answers UNAUTHENTICATED without a root key and with an unknown one", async () => {
      const none = await grpcError(clients.call(clients.identities, "ListIdentities", {}, null));
      expect(none.code).toBe(grpc.status.UNAUTHENTICATED);
      const unknown = await grpcError(clients.call(clients.identities, "ListIdentities", {}, "lkroot_3274FQo5GrAioh7Z11kTEUnxd64zMqoPp5aqzQ1"));
      expect(unknown.code).toBe(grpc.status.UNAUTHENTICATED);
      const garbage = await grpcError(clients.call(clients.keys, "GetKey", { id: "key_x" }, "not-a-key"));
      expect(garbage.code).toBe(grpc.status.UNAUTHENTICATED);
    });
  });

  describe("Python grpcio client generated from proto/", () => {
    itWithTool(python, "python3 with grpcio and grpcio-tools", "creates an identity and two keys by external_id and reads them back", async (py) => {
      const gen = tempDir("pygen");
      const protos = readdirSync(path.join(PROTO_DIR, "latchkey/v1"))
        .filter((f) => f.endsWith(".proto"))
        .map((f) => `latchkey/v1/${f}`);
      const protoc = await run(py, ["-m", "grpc_tools.protoc", `-I${PROTO_DIR}`, `--python_out=${gen}`, `--grpc_python_out=${gen}`, ...protos], {
        timeoutMs: 60_000,
      });
      expect(protoc.code, protoc.stderr).toBe(0);

      const ext = externalId("google");
      const res = await run(
        py,
        [path.join(REPO, "test/python/identity_keys_client.py"), "--gen-dir", gen, "--address", server.address, "--root-key", rootKey, "--external-id", ext, "--api-id", "api_py"],
        { timeoutMs: 60_000 },
      );
      expect(res.code, res.stderr).toBe(0);
      const out = JSON.parse(res.stdout) as Msg;

      expect(out.created_identity).toEqual({ id: expect.stringMatching(/^id_/), external_id: ext, meta: { plan: "pro", seats: 3 } });
      const identityId = out.created_identity.id;
      expect(out.created_keys).toHaveLength(2);
      for (const k of out.created_keys) {
        expect(k.plaintext).toMatch(/^py_/);
        expect(k.plaintext.startsWith(k.start)).toBe(true);
        expect(k).toMatchObject({ identity_id: identityId, external_id: ext });
      }
      const ids = out.created_keys.map((k: Msg) => k.id);
      expect(new Set(ids).size).toBe(2);
      expect(out.fetched_keys).toEqual([
        { id: ids[0], name: "primary", identity_id: identityId, external_id: ext, api_id: "api_py" },
        { id: ids[1], name: "secondary", identity_id: identityId, external_id: ext, api_id: "api_py" },
      ]);
      expect([...out.listed_key_ids].sort()).toEqual([...ids].sort());
      expect(out.identity_by_external_id).toEqual(out.created_identity);
      expect(out.unauthenticated_call).toBe("UNAUTHENTICATED");
    }, 120_000);
  });

  describe("buf curl and Connect over HTTP/1.1", () => {
    it("lists every Latchkey RPC through server reflection", async () => {
      const res = await run(BUF, ["curl", "--http2-prior-knowledge", "--protocol", "grpc", "--list-methods", server.baseUrl]);
      expect(res.code, res.stderr).toBe(0);
      const listed = res.stdout.split("\n").filter(Boolean);
      const expected = [IdentityService, KeyService].flatMap((s) => s.methods.map((m) => `${s.typeName}/${m.name}`));
      expect(expected.length).toBeGreaterThanOrEqual(15);
      expect(listed).toEqual(expect.arrayContaining([...expected, "grpc.health.v1.Health/Check", "grpc.health.v1.Health/Watch"]));
    });

    it("round-trips CreateIdentity over gRPC (reflection) and GetIdentity over Connect/HTTP 1.1 (schema from proto/)", async () => {
      const ext = externalId("workos");
      const auth = `authorization: Bearer ${rootKey}`;
      const created = await run(BUF, [
        "curl",
        "--http2-prior-knowledge",
        "--protocol",
        "grpc",
        "-H",
        auth,
        "-d",
        JSON.stringify({ external_id: ext, meta: { tier: "gold", seats: 5 } }),
        `${server.baseUrl}/latchkey.v1.IdentityService/CreateIdentity`,
      ]);
      expect(created.code, created.stderr).toBe(0);
      const identity = (JSON.parse(created.stdout) as Msg).identity;
      expect(identity).toMatchObject({ externalId: ext, meta: { tier: "gold", seats: 5 } });

      const got = await run(BUF, [
        "curl",
        "--schema",
        REPO,
        "--protocol",
        "connect",
        "-H",
        auth,
        "-d",
        JSON.stringify({ external_id: ext }),
        `${server.baseUrl}/latchkey.v1.IdentityService/GetIdentity`,
      ]);
      expect(got.code, got.stderr).toBe(0);
      expect((JSON.parse(got.stdout) as Msg).identity).toEqual(identity);
    });

    it("reports a failed call with its code and a non-zero exit", async () => {
      const res = await run(BUF, [
        "curl",
        "--http2-prior-knowledge",
        "--protocol",
        "grpc",
        "-d",
        JSON.stringify({ external_id: "whoever" }),
        `${server.baseUrl}/latchkey.v1.IdentityService/GetIdentity`,
      ]);
      expect(res.code).not.toBe(0);
      expect(res.stdout + res.stderr).toMatch(/unauthenticated/i);
    });

    it("serves the Connect protocol with JSON over HTTP/1.1 to plain fetch", async () => {
      const ext = externalId("clerk");
      const created = await connectCall(server, "latchkey.v1.KeyService/CreateKey", JSON.stringify({ apiId: "api_fetch", externalId: ext, name: "web" }), rootKey);
      expect(created.status).toBe(200);
      expect(created.json.key).toMatchObject({ apiId: "api_fetch", externalId: ext, name: "web", enabled: true });
      expect(typeof created.json.plaintext).toBe("string");

      const listed = await connectCall(server, "latchkey.v1.KeyService/ListKeys", JSON.stringify({ external_id: ext }), rootKey);
      expect(listed.status).toBe(200);
      expect(listed.json.keys.map((k: Msg) => k.id)).toEqual([created.json.key.id]);

      const denied = await connectCall(server, "latchkey.v1.KeyService/ListKeys", JSON.stringify({ external_id: ext }), null);
      expect(denied.status).toBe(401);
      expect(denied.json.code).toBe("unauthenticated");

      const notFound = await connectCall(server, "latchkey.v1.IdentityService/GetIdentity", JSON.stringify({ externalId: externalId("auth0") }), rootKey);
      expect(notFound.status).toBe(404);
      expect(notFound.json.code).toBe("not_found");
    });
  });

  describe("grpcurl", () => {
    itWithTool(grpcurl, "grpcurl", "lists the services through reflection", async (bin) => {
      const res = await run(bin, ["-plaintext", server.address, "list"]);
      expect(res.code, res.stderr).toBe(0);
      expect(res.stdout.split("\n")).toEqual(
        expect.arrayContaining(["latchkey.v1.IdentityService", "latchkey.v1.KeyService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"]),
      );
      const described = await run(bin, ["-plaintext", server.address, "describe", "latchkey.v1.KeyService"]);
      expect(described.code, described.stderr).toBe(0);
      expect(described.stdout).toContain("rpc VerifyKey ( .latchkey.v1.VerifyKeyRequest ) returns ( .latchkey.v1.VerifyKeyResponse )");
    });

    itWithTool(grpcurl, "grpcurl", "creates an identity with JSON and the reference client reads it back", async (bin) => {
      const ext = externalId("google");
      const res = await run(bin, [
        "-plaintext",
        "-H",
        `authorization: Bearer ${rootKey}`,
        "-d",
        JSON.stringify({ external_id: ext, meta: { source: "grpcurl" } }),
        server.address,
        "latchkey.v1.IdentityService/CreateIdentity",
      ]);
      expect(res.code, res.stderr).toBe(0);
      const created = (JSON.parse(res.stdout) as Msg).identity;
      expect(created).toMatchObject({ externalId: ext, meta: { source: "grpcurl" } });

      const { identity } = await clients.call(clients.identities, "GetIdentity", { id: created.id }, rootKey);
      expect(identity.external_id).toBe(ext);

      const bad = await run(bin, ["-plaintext", "-H", `authorization: Bearer ${rootKey}`, "-d", '{"external_id":""}', server.address, "latchkey.v1.IdentityService/CreateIdentity"]);
      expect(bad.code).not.toBe(0);
      expect(bad.stderr).toMatch(/Code: InvalidArgument[\s\S]*external_id/);
    });
  });

  describe("health", () => {
    itWithTool(healthProbe, "grpc-health-probe", "grpc-health-probe reports SERVING for the server and each service", async (bin) => {
      for (const service of [[], ["-service", "latchkey.v1.KeyService"], ["-service", "latchkey.v1.IdentityService"]]) {
        const res = await run(bin, [`-addr=${server.address}`, "-connect-timeout=5s", "-rpc-timeout=5s", ...service]);
        expect(res.code, res.stderr).toBe(0);
        expect(res.stdout + res.stderr).toContain("status: SERVING");
      }
      const unknown = await run(bin, [`-addr=${server.address}`, "-service", "no.such.Service"]);
      expect(unknown.code).not.toBe(0);
    });

    it("answers Health/Check without a root key", async () => {
      const { status } = await clients.call(clients.health, "Check", { service: "" }, null);
      expect(status).toBe("SERVING");
    });
  });

  describe("metrics", () => {
    it("serves Prometheus text with RPC counts by method and code on the metrics port", async () => {
      expect(server.metricsPort).toEqual(expect.any(Number));
      await clients.call(clients.identities, "CreateIdentity", { external_id: externalId("clerk") }, rootKey);
      await grpcError(clients.call(clients.identities, "GetIdentity", { external_id: "nobody" }, null));

      const res = await fetch(`http://127.0.0.1:${server.metricsPort}/metrics`, { signal: AbortSignal.timeout(10_000) });
      expect(res.status).toBe(200);
      expect(res.headers.get("content-type")).toMatch(/^text\/plain/);
      const text = await res.text();
      expect(text).toContain("# TYPE latchkey_rpc_requests_total counter");
      const count = (method: string, code: RegExp) =>
        text
          .split("\n")
          .filter((l) => l.startsWith("latchkey_rpc_requests_total{") && l.includes(`method="${method}"`) && code.test(l))
          .reduce((n, l) => n + Number(l.split(" ").pop()), 0);
      expect(count("latchkey.v1.IdentityService/CreateIdentity", /code="ok"/)).toBeGreaterThanOrEqual(1);
      expect(count("latchkey.v1.IdentityService/GetIdentity", /code="unauthenticated"/i)).toBeGreaterThanOrEqual(1);
      expect(text).toMatch(/^latchkey_rpc_duration_seconds_bucket\{/m);

      const other = await fetch(`http://127.0.0.1:${server.metricsPort}/`, { signal: AbortSignal.timeout(10_000) });
      expect(other.status).toBe(404);
    });
  });
});

/** Hostile bodies over the Connect protocol, on each store the environment offers. */
const stores: { name: string; env: () => Record<string, string>; cleanup: (env: Record<string, string>) => Promise<void> }[] = [
  { name: "embedded", env: () => ({}), cleanup: async () => undefined },
  {
    name: "mongodb",
    env: () => ({ MONGODB_URI, LATCHKEY_MONGODB_DATABASE: uniqueName("lk_it_hostile") }),
    cleanup: (env) => dropMongoDatabase(env.LATCHKEY_MONGODB_DATABASE),
  },
];

describe.each(stores)("hostile input over the wire ($name store)", ({ name, env: makeEnv, cleanup }) => {
  const available = name !== "mongodb" || MONGODB_URI !== "";
  let server: ServerProcess;
  let rootKey: string;
  let env: Record<string, string>;

  beforeAll(async () => {
    if (!available) return;
    env = makeEnv();
    server = await startServer({ env });
    rootKey = server.bootstrapKey!;
  });

  afterAll(async () => {
    if (server) expect(await server.stop()).toEqual({ code: 0, signal: null });
    if (env) await cleanup(env);
  });

  const test = available ? it : IN_CI ? it : it.skip;

  test("rejects query operators in place of strings as INVALID_ARGUMENT and stays healthy", async () => {
    if (!available) throw new Error("MONGODB_URI must be set in CI (.ci/run starts FerretDB)");
    const operator = { $gt: "" };
    const cases: [string, Msg][] = [
      ["latchkey.v1.IdentityService/GetIdentity", { external_id: operator }],
      ["latchkey.v1.IdentityService/CreateIdentity", { external_id: operator }],
      ["latchkey.v1.IdentityService/DeleteIdentity", { external_id: operator }],
      ["latchkey.v1.IdentityService/ListIdentities", { search: operator }],
      ["latchkey.v1.KeyService/ListKeys", { external_id: operator }],
      ["latchkey.v1.KeyService/ListKeys", { api_id: { $ne: null } }],
      ["latchkey.v1.KeyService/CreateKey", { api_id: "api_hostile", external_id: operator }],
      ["latchkey.v1.KeyService/GetKey", { id: { $regex: ".*" } }],
      // The operator as a string is just a malformed external_id.
      ["latchkey.v1.IdentityService/GetIdentity", { external_id: JSON.stringify(operator) }],
      ["latchkey.v1.KeyService/CreateKey", { api_id: "api_hostile", external_id: '{"$gt":""}' }],
    ];
    for (const [rpc, body] of cases) {
      const res = await connectCall(server, rpc, JSON.stringify(body), rootKey);
      expect({ rpc, body, status: res.status, code: res.json.code }).toEqual({ rpc, body, status: 400, code: "invalid_argument" });
    }

    const malformed = await connectCall(server, "latchkey.v1.IdentityService/CreateIdentity", '{"external_id": "a", ', rootKey);
    expect(malformed.json.code).toBe("invalid_argument");
    const oversized = await connectCall(
      server,
      "latchkey.v1.IdentityService/CreateIdentity",
      JSON.stringify({ external_id: externalId("clerk"), meta: { blob: "x".repeat(70 * 1024) } }),
      rootKey,
    );
    expect({ status: oversized.status, code: oversized.json.code }).toEqual({ status: 400, code: "invalid_argument" });
    expect(oversized.json.message).toMatch(/^meta\b/);

    // Nothing was created by any of the above, and the process still serves.
    const listed = await connectCall(server, "latchkey.v1.IdentityService/ListIdentities", "{}", rootKey);
    expect(listed.status).toBe(200);
    expect(listed.json.identities ?? []).toEqual([]);
    expect(server.proc.exitCode).toBeNull();
    const health = await connectCall(server, "grpc.health.v1.Health/Check", "{}", null);
    expect(health).toEqual({ status: 200, json: { status: "SERVING" } });
  });

  test("stores operator-looking meta keys and values verbatim", async () => {
    if (!available) throw new Error("MONGODB_URI must be set in CI (.ci/run starts FerretDB)");
    const ext = externalId("auth0");
    const meta = { note: { $gt: "" }, where: "$where: sleep(1000)", nested: { $set: { admin: true } } };
    const created = await connectCall(server, "latchkey.v1.IdentityService/CreateIdentity", JSON.stringify({ external_id: ext, meta }), rootKey);
    // Either refused as INVALID_ARGUMENT or stored exactly; never an INTERNAL error.
    if (created.status === 400) {
      expect(created.json.code).toBe("invalid_argument");
      return;
    }
    expect(created.status, JSON.stringify(created.json)).toBe(200);
    const got = await connectCall(server, "latchkey.v1.IdentityService/GetIdentity", JSON.stringify({ external_id: ext }), rootKey);
    expect(got.json.identity.meta).toEqual(meta);
  });
});

describe("graceful shutdown", () => {
  it("streams SERVING then NOT_SERVING on Health/Watch when the server gets SIGTERM, and exits 0", async () => {
    const server = await startServer();
    const clients = grpcClients(server.address);
    try {
      const statuses: string[] = [];
      const call = (clients.health as unknown as { Watch(req: Msg): grpc.ClientReadableStream<Msg> }).Watch({ service: "" });
      const ended = new Promise<string>((resolve) => {
        call.on("error", (err: grpc.ServiceError) => resolve(`error ${grpc.status[err.code]}`));
        call.on("end", () => resolve("end"));
      });
      const firstStatus = new Promise<void>((resolve) =>
        call.on("data", (m: Msg) => {
          statuses.push(m.status);
          resolve();
        }),
      );
      await firstStatus;
      expect(statuses).toEqual(["SERVING"]);

      const exit = server.kill("SIGTERM");
      const how = await ended;
      expect(statuses).toEqual(["SERVING", "NOT_SERVING"]);
      expect(how).toBe("end");
      expect(await exit).toEqual({ code: 0, signal: null });
      expect(server.stdout()).toContain('"msg":"stopped"');
    } finally {
      clients.close();
      await server.kill("SIGKILL");
    }
  });
});
