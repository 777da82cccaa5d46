/**
 * TLS on the one port (gRPC over HTTP/2 by ALPN, Connect over HTTP/1.1), and
 * the root-key command line: create, list, revoke.
 */
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import https from "node:https";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { PROTO_DIR, grpcClients, grpcError, runCli, startServer, tempDir, type ServerProcess } from "./support.js";

function selfSigned(): { cert: string; key: string } {
  const dir = tempDir("tls");
  const cert = path.join(dir, "cert.pem");
  const key = path.join(dir, "key.pem");
  execFileSync("openssl", [
    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", key, "-out", cert,
  ], { stdio: "ignore" });
  return { cert, key };
}

describe("TLS", () => {
  let server: ServerProcess;
  let tls: { cert: string; key: string };

  beforeAll(async () => {
    tls = selfSigned();
    server = await startServer({ env: { LATCHKEY_TLS_CERT: tls.cert, LATCHKEY_TLS_KEY: tls.key } });
  });
  afterAll(async () => {
    await server?.stop();
  });

  it("serves native gRPC over TLS (HTTP/2 by ALPN)", async () => {
    const def = protoLoader.loadSync(["grpc/health/v1/health.proto"], { includeDirs: [PROTO_DIR], keepCase: true, enums: String });
    const pkg = grpc.loadPackageDefinition(def) as any;
    const client = new pkg.grpc.health.v1.Health(server.address, grpc.credentials.createSsl(readFileSync(tls.cert)));
    try {
      const res = await new Promise<any>((resolve, reject) =>
        client.Check({ service: "" }, { deadline: Date.now() + 10_000 }, (err: Error | null, r: any) => (err ? reject(err) : resolve(r))),
      );
      expect(res.status).toBe("SERVING");
    } finally {
      client.close();
    }
  });

  it("serves the Connect protocol over HTTP/1.1 with TLS, and refuses plaintext", async () => {
    const body = await new Promise<{ status: number; text: string }>((resolve, reject) => {
      const req = https.request(
        `https://127.0.0.1:${server.port}/latchkey.v1.IdentityService/GetIdentity`,
        { method: "POST", ca: readFileSync(tls.cert), headers: { "content-type": "application/json", authorization: `Bearer ${server.bootstrapKey}` } },
        (res) => {
          let text = "";
          res.setEncoding("utf8").on("data", (d) => (text += d)).on("end", () => resolve({ status: res.statusCode!, text }));
        },
      );
      req.on("error", reject);
      req.end(JSON.stringify({ external_id: "nobody" }));
    });
    expect(body.status).toBe(404);
    expect(JSON.parse(body.text).code).toBe("not_found");
    const plain = grpcClients(server.address);
    try {
      const err = await grpcError(plain.call(plain.health, "Check", { service: "" }, null));
      expect(err.code).toBe(grpc.status.UNAVAILABLE);
    } finally {
      plain.close();
    }
  });
});

describe("root keys on the command line", () => {
  let server: ServerProcess;
  beforeAll(async () => {
    // No root-key cache: a revocation is seen on the next call.
    server = await startServer({ env: { LATCHKEY_ROOT_KEY_CACHE_MS: "0" } });
  });
  afterAll(async () => {
    await server?.stop();
  });

  const env = () => ({ LATCHKEY_DATA_DIR: server.dataDir });

  it("creates a scoped root key, lists it without its secret, and revokes it", async () => {
    const created = await runCli(["root-keys", "create", "--name", "checkout", "--permission", "verify:api_a", "--permission", "read"], env());
    expect(created.code, created.stderr).toBe(0);
    const made = JSON.parse(created.stdout) as { id: string; key: string; permissions: string[] };
    expect(made.key).toMatch(/^lkroot_/);
    expect(made.permissions).toEqual(["verify:api_a", "read"]);

    const c = grpcClients(server.address);
    try {
      await c.call(c.identities, "ListIdentities", {}, made.key);
      const denied = await grpcError(c.call(c.identities, "CreateIdentity", { external_id: "x" }, made.key));
      expect(denied.code).toBe(grpc.status.PERMISSION_DENIED);

      const listed = await runCli(["root-keys", "list"], env());
      expect(listed.code).toBe(0);
      const rows = listed.stdout.trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);
      const row = rows.find((r) => r.id === made.id)!;
      expect(row).toMatchObject({ name: "checkout", permissions: ["verify:api_a", "read"] });
      expect(listed.stdout).not.toContain(made.key);

      const revoked = await runCli(["root-keys", "revoke", made.id], env());
      expect(revoked.code).toBe(0);
      const after = await grpcError(c.call(c.identities, "ListIdentities", {}, made.key));
      expect(after.code).toBe(grpc.status.UNAUTHENTICATED);
      expect((await runCli(["root-keys", "revoke", made.id], env())).code).toBe(1);
    } finally {
      c.close();
    }
  });

  it("refuses a bad permission with a usage message and exit code 2", async () => {
    const bad = await runCli(["root-keys", "create", "--name", "x", "--permission", "delete"], env());
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/action must be read, write, verify, usage or \*/);
  });
});
