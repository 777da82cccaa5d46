/**
 * Integration tier: the permission matrix at the wire. The real server process,
 * root keys made with the real CLI, and real clients (gRPC over HTTP/2 — the lean
 * unary path — and Connect JSON over HTTP/1.1 — Connect-Node). Every RPC ×
 * {global, scoped to api_a, scoped to api_b} root key × {a key and an identity of
 * api_a, of api_b, none}, each asserting the exact code, and that a refused call
 * changed nothing.
 *
 * The rule (README, "Access control"): a root key scoped to an api sees and changes
 * only that api's keys; identities are shared by all apis, so reading, creating,
 * changing, or linking a key to an identity needs a global permission.
 */
import { Code, ConnectError, createClient, type Client, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { randomBytes } from "node:crypto";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { IdentityService } from "../../gen/latchkey/v1/identity_service_pb.js";
import { CreditsOperation, KeyService } from "../../gen/latchkey/v1/key_service_pb.js";
import { Granularity, VerificationCode } from "../../gen/latchkey/v1/usage_pb.js";
import { credits, mask, ratelimit } from "../support/proto.js";
import { runCli, startServer, type ServerProcess } from "./support.js";

const API_A = "api_a";
const API_B = "api_b";

interface Clients {
  identities: Client<typeof IdentityService>;
  keys: Client<typeof KeyService>;
}

/** What each test starts from, made by the global root key. */
interface Fixture {
  /** Prefix of every external id this test made, so ListIdentities can find them all. */
  tag: string;
  /** Identity of a customer of api_a (keyA is linked to it). */
  x: { id: string; externalId: string };
  /** Identity of a customer of api_b only (keyB is linked to it). */
  y: { id: string; externalId: string };
  keyA: { id: string; plaintext: string };
  /** A key of api_a with no identity. */
  keyA0: { id: string };
  keyB: { id: string; plaintext: string };
  /** An external id no identity has (yet). */
  newExternalId: string;
}

type Principal = "global" | "scopedA" | "scopedB";
/** The outcome of a call: "OK", a status code name, or VerifyKey's answer. */
type Outcome = "OK" | keyof typeof Code | "VALID" | "NOT_FOUND answer";

interface Row {
  rpc: string;
  target: string;
  call: (c: Clients, f: Fixture) => Promise<unknown>;
  expect: Record<Principal, Outcome>;
}

const OK = "OK";
const DENIED = "PermissionDenied";
const NOT_FOUND = "NotFound";
/** Identity RPCs and anything touching an identity: global root keys only. */
const GLOBAL_ONLY = { global: OK, scopedA: DENIED, scopedB: DENIED } as const;
/** A key of api_a: its api's root key may, the other api's key does not see it. */
const KEY_OF_A = { global: OK, scopedA: OK, scopedB: NOT_FOUND } as const;
const KEY_OF_B = { global: OK, scopedA: NOT_FOUND, scopedB: OK } as const;

const usageRange = () => ({ startTime: { seconds: BigInt(Math.floor(Date.now() / 1000) - 3600), nanos: 0 }, granularity: Granularity.HOUR });

const MATRIX: Row[] = [
  // IdentityService: identities belong to no api.
  { rpc: "CreateIdentity", target: "a new identity", call: (c, f) => c.identities.createIdentity({ externalId: f.newExternalId }), expect: GLOBAL_ONLY },
  { rpc: "GetIdentity", target: "api_a's customer, by id", call: (c, f) => c.identities.getIdentity({ lookup: { case: "id", value: f.x.id } }), expect: GLOBAL_ONLY },
  {
    rpc: "GetIdentity",
    target: "api_b's customer, by external_id",
    call: (c, f) => c.identities.getIdentity({ lookup: { case: "externalId", value: f.y.externalId } }),
    expect: GLOBAL_ONLY,
  },
  { rpc: "ListIdentities", target: "all", call: (c, f) => c.identities.listIdentities({ search: f.tag }), expect: GLOBAL_ONLY },
  {
    rpc: "UpdateIdentity",
    target: "api_a's customer",
    call: (c, f) => c.identities.updateIdentity({ identity: { id: f.x.id, meta: { changed: true } }, updateMask: mask("meta") }),
    expect: GLOBAL_ONLY,
  },
  { rpc: "DeleteIdentity", target: "api_a's customer", call: (c, f) => c.identities.deleteIdentity({ lookup: { case: "id", value: f.x.id } }), expect: GLOBAL_ONLY },
  {
    rpc: "GetIdentityUsage",
    target: "api_a's customer",
    call: (c, f) => c.identities.getIdentityUsage({ lookup: { case: "id", value: f.x.id }, ...usageRange() }),
    expect: GLOBAL_ONLY,
  },

  // CreateKey: a key of the api, but linking it to an identity is an identity change.
  { rpc: "CreateKey", target: "in api_a, no identity", call: (c) => c.keys.createKey({ apiId: API_A }), expect: { global: OK, scopedA: OK, scopedB: DENIED } },
  { rpc: "CreateKey", target: "in api_b, no identity", call: (c) => c.keys.createKey({ apiId: API_B }), expect: { global: OK, scopedA: DENIED, scopedB: OK } },
  {
    rpc: "CreateKey",
    target: "in api_a, linked by identity_id to api_a's customer",
    call: (c, f) => c.keys.createKey({ apiId: API_A, identity: { case: "identityId", value: f.x.id } }),
    expect: { global: OK, scopedA: DENIED, scopedB: DENIED },
  },
  {
    rpc: "CreateKey",
    target: "in api_a, linked by identity_id to api_b's customer",
    call: (c, f) => c.keys.createKey({ apiId: API_A, identity: { case: "identityId", value: f.y.id } }),
    expect: { global: OK, scopedA: DENIED, scopedB: DENIED },
  },
  {
    rpc: "CreateKey",
    target: "in api_a, linked by external_id to api_a's customer",
    call: (c, f) => c.keys.createKey({ apiId: API_A, identity: { case: "externalId", value: f.x.externalId } }),
    expect: { global: OK, scopedA: DENIED, scopedB: DENIED },
  },
  {
    rpc: "CreateKey",
    target: "in api_a, linked by external_id to api_b's customer",
    call: (c, f) => c.keys.createKey({ apiId: API_A, identity: { case: "externalId", value: f.y.externalId } }),
    expect: { global: OK, scopedA: DENIED, scopedB: DENIED },
  },
  {
    rpc: "CreateKey",
    target: "in api_b, linked by external_id to api_b's customer",
    call: (c, f) => c.keys.createKey({ apiId: API_B, identity: { case: "externalId", value: f.y.externalId } }),
    expect: { global: OK, scopedA: DENIED, scopedB: DENIED },
  },
  {
    rpc: "CreateKey",
    target: "in api_a, by an external_id no identity has (creating it)",
    call: (c, f) => c.keys.createKey({ apiId: API_A, identity: { case: "externalId", value: f.newExternalId } }),
    expect: { global: OK, scopedA: DENIED, scopedB: DENIED },
  },

  // Reading keys: the link (identity_id, external_id) is part of the api's key.
  { rpc: "GetKey", target: "api_a's key", call: (c, f) => c.keys.getKey({ id: f.keyA.id }), expect: KEY_OF_A },
  { rpc: "GetKey", target: "api_b's key", call: (c, f) => c.keys.getKey({ id: f.keyB.id }), expect: KEY_OF_B },
  { rpc: "ListKeys", target: "api_a", call: (c) => c.keys.listKeys({ apiId: API_A }), expect: { global: OK, scopedA: OK, scopedB: DENIED } },
  {
    rpc: "ListKeys",
    target: "api_a, of api_a's customer",
    call: (c, f) => c.keys.listKeys({ apiId: API_A, identityId: f.x.id }),
    expect: { global: OK, scopedA: OK, scopedB: DENIED },
  },
  {
    rpc: "ListKeys",
    target: "api_b, of api_b's customer by external_id",
    call: (c, f) => c.keys.listKeys({ apiId: API_B, externalId: f.y.externalId }),
    expect: { global: OK, scopedA: DENIED, scopedB: OK },
  },
  {
    rpc: "ListKeys",
    target: "every api, of api_a's customer",
    call: (c, f) => c.keys.listKeys({ identityId: f.x.id }),
    expect: { global: OK, scopedA: DENIED, scopedB: DENIED },
  },

  // UpdateKey: the key's own fields are the api's; its identity link is not.
  { rpc: "UpdateKey", target: "api_a's key, name", call: (c, f) => c.keys.updateKey({ key: { id: f.keyA.id, name: "renamed" }, updateMask: mask("name") }), expect: KEY_OF_A },
  { rpc: "UpdateKey", target: "api_b's key, name", call: (c, f) => c.keys.updateKey({ key: { id: f.keyB.id, name: "renamed" }, updateMask: mask("name") }), expect: KEY_OF_B },
  {
    rpc: "UpdateKey",
    target: "api_a's key, credits and limits",
    call: (c, f) =>
      c.keys.updateKey({ key: { id: f.keyA.id, credits: credits(5), ratelimits: [ratelimit("own", 5, 60)] }, updateMask: mask("credits", "ratelimits") }),
    expect: KEY_OF_A,
  },
  {
    rpc: "UpdateKey",
    target: "api_a's unlinked key, attach to api_a's customer by identity_id",
    call: (c, f) => c.keys.updateKey({ key: { id: f.keyA0.id, identityId: f.x.id }, updateMask: mask("identity_id") }),
    expect: GLOBAL_ONLY,
  },
  {
    rpc: "UpdateKey",
    target: "api_a's key, move to api_b's customer by identity_id",
    call: (c, f) => c.keys.updateKey({ key: { id: f.keyA.id, identityId: f.y.id }, updateMask: mask("identity_id") }),
    expect: GLOBAL_ONLY,
  },
  {
    rpc: "UpdateKey",
    target: "api_a's key, move to api_b's customer by external_id",
    call: (c, f) => c.keys.updateKey({ key: { id: f.keyA.id, externalId: f.y.externalId }, updateMask: mask("external_id") }),
    expect: GLOBAL_ONLY,
  },
  {
    rpc: "UpdateKey",
    target: "api_a's key, to an external_id no identity has (creating it)",
    call: (c, f) => c.keys.updateKey({ key: { id: f.keyA.id, externalId: f.newExternalId }, updateMask: mask("external_id") }),
    expect: GLOBAL_ONLY,
  },
  {
    rpc: "UpdateKey",
    target: "api_a's key, detach from its identity",
    call: (c, f) => c.keys.updateKey({ key: { id: f.keyA.id, identityId: "" }, updateMask: mask("identity_id") }),
    expect: GLOBAL_ONLY,
  },
  {
    rpc: "UpdateKey",
    target: "api_b's key, move to api_a's customer",
    call: (c, f) => c.keys.updateKey({ key: { id: f.keyB.id, identityId: f.x.id }, updateMask: mask("identity_id") }),
    expect: GLOBAL_ONLY,
  },

  { rpc: "DeleteKey", target: "api_a's key", call: (c, f) => c.keys.deleteKey({ id: f.keyA.id }), expect: KEY_OF_A },
  { rpc: "DeleteKey", target: "api_b's key", call: (c, f) => c.keys.deleteKey({ id: f.keyB.id }), expect: KEY_OF_B },
  // The new key replaces one the identity already has in this api: the link is kept.
  { rpc: "RerollKey", target: "api_a's linked key", call: (c, f) => c.keys.rerollKey({ id: f.keyA.id }), expect: KEY_OF_A },
  { rpc: "RerollKey", target: "api_b's linked key", call: (c, f) => c.keys.rerollKey({ id: f.keyB.id }), expect: KEY_OF_B },
  {
    rpc: "UpdateCredits",
    target: "api_a's key",
    call: (c, f) => c.keys.updateCredits({ target: { case: "keyId", value: f.keyA.id }, operation: CreditsOperation.SET, value: 7n }),
    expect: KEY_OF_A,
  },
  {
    rpc: "UpdateCredits",
    target: "api_b's key",
    call: (c, f) => c.keys.updateCredits({ target: { case: "keyId", value: f.keyB.id }, operation: CreditsOperation.SET, value: 7n }),
    expect: KEY_OF_B,
  },
  {
    rpc: "UpdateCredits",
    target: "api_a's customer",
    call: (c, f) => c.keys.updateCredits({ target: { case: "identityId", value: f.x.id }, operation: CreditsOperation.SET, value: 7n }),
    expect: GLOBAL_ONLY,
  },

  // VerifyKey answers for keys it may see: the identity comes with the api's key.
  {
    rpc: "VerifyKey",
    target: "api_a's linked key",
    call: (c, f) => verifyOutcome(c, f.keyA.plaintext, ""),
    expect: { global: "VALID", scopedA: "VALID", scopedB: "NOT_FOUND answer" },
  },
  {
    rpc: "VerifyKey",
    target: "api_b's linked key, naming api_b",
    call: (c, f) => verifyOutcome(c, f.keyB.plaintext, API_B),
    expect: { global: "VALID", scopedA: "NOT_FOUND answer", scopedB: "VALID" },
  },
  { rpc: "GetKeyUsage", target: "api_a's key", call: (c, f) => c.keys.getKeyUsage({ id: f.keyA.id, ...usageRange() }), expect: KEY_OF_A },
  { rpc: "GetKeyUsage", target: "api_b's key", call: (c, f) => c.keys.getKeyUsage({ id: f.keyB.id, ...usageRange() }), expect: KEY_OF_B },
];

class VerifyAnswer {
  constructor(readonly outcome: Outcome) {}
}

async function verifyOutcome(c: Clients, key: string, apiId: string): Promise<VerifyAnswer> {
  const res = await c.keys.verifyKey({ key, apiId });
  if (res.code === VerificationCode.VALID) {
    // The identity's meta comes with a key the caller may verify.
    expect(res.identity?.meta).toEqual({ customer: true });
    return new VerifyAnswer("VALID");
  }
  if (res.code === VerificationCode.NOT_FOUND) {
    expect(res.identity, "nothing of the identity of a key the caller may not see").toBeUndefined();
    return new VerifyAnswer("NOT_FOUND answer");
  }
  return new VerifyAnswer(VerificationCode[res.code] as Outcome);
}

async function outcomeOf(p: Promise<unknown>): Promise<Outcome> {
  try {
    const res = await p;
    return res instanceof VerifyAnswer ? res.outcome : OK;
  } catch (err) {
    return Code[ConnectError.from(err).code] as Outcome;
  }
}

function clientsOf(transport: Transport): Clients {
  return { identities: createClient(IdentityService, transport), keys: createClient(KeyService, transport) };
}

const PROTOCOLS: [string, (baseUrl: string, rootKey: string) => Transport][] = [
  [
    "gRPC over HTTP/2",
    (baseUrl, rootKey) =>
      createGrpcTransport({ baseUrl, interceptors: [(next) => (req) => (req.header.set("authorization", `Bearer ${rootKey}`), next(req))] }),
  ],
  [
    "Connect JSON over HTTP/1.1",
    (baseUrl, rootKey) =>
      createConnectTransport({
        baseUrl,
        httpVersion: "1.1",
        interceptors: [(next) => (req) => (req.header.set("authorization", `Bearer ${rootKey}`), next(req))],
      }),
  ],
];

describe.each(PROTOCOLS)("the permission matrix over %s", (_protocol, transportFor) => {
  let server: ServerProcess;
  const clients = {} as Record<Principal, Clients>;
  let f: Fixture;

  beforeAll(async () => {
    server = await startServer();
    const rootKey = async (...permissions: string[]) => {
      const res = await runCli(["root-keys", "create", "--name", "matrix", ...permissions.flatMap((p) => ["--permission", p])], {
        LATCHKEY_DATA_DIR: server.dataDir,
      });
      expect(res.code, res.stderr).toBe(0);
      return (JSON.parse(res.stdout) as { key: string }).key;
    };
    // `*:api_a` is read, write, verify and usage, each scoped to api_a.
    const [g, a, b] = await Promise.all([rootKey("*"), rootKey(`*:${API_A}`), rootKey(`*:${API_B}`)]);
    clients.global = clientsOf(transportFor(server.baseUrl, g));
    clients.scopedA = clientsOf(transportFor(server.baseUrl, a));
    clients.scopedB = clientsOf(transportFor(server.baseUrl, b));
  });

  afterAll(async () => {
    expect(await server.stop()).toEqual({ code: 0, signal: null });
  });

  beforeEach(async () => {
    const admin = clients.global;
    const tag = `m${randomBytes(5).toString("hex")}`;
    const identity = async (name: string) => {
      const { identity } = await admin.identities.createIdentity({ externalId: `${tag}_${name}`, meta: { customer: true }, credits: credits(1000) });
      return { id: identity!.id, externalId: identity!.externalId };
    };
    const [x, y] = await Promise.all([identity("x"), identity("y")]);
    const [a, a0, b] = await Promise.all([
      admin.keys.createKey({ apiId: API_A, identity: { case: "identityId", value: x.id } }),
      admin.keys.createKey({ apiId: API_A }),
      admin.keys.createKey({ apiId: API_B, identity: { case: "identityId", value: y.id } }),
    ]);
    f = {
      tag,
      x,
      y,
      keyA: { id: a.key!.id, plaintext: a.plaintext },
      keyA0: { id: a0.key!.id },
      keyB: { id: b.key!.id, plaintext: b.plaintext },
      newExternalId: `${tag}_new`,
    };
  });

  /** Everything a call of the matrix could change, read by the global root key. */
  async function snapshot() {
    const admin = clients.global;
    const [keys, identities, linked] = await Promise.all([
      Promise.all([f.keyA.id, f.keyA0.id, f.keyB.id].map((id) => outcomeAndValue(admin.keys.getKey({ id })))),
      admin.identities.listIdentities({ search: f.tag }),
      Promise.all([f.x.id, f.y.id].map(async (identityId) => (await admin.keys.listKeys({ identityId })).keys.map((k) => k.id).sort())),
    ]);
    return {
      keys,
      identities: identities.identities.map((i) => [i.id, i.externalId, i.meta, i.credits?.remaining, String(i.updatedAt?.seconds), i.updatedAt?.nanos]),
      linked,
    };
  }

  async function outcomeAndValue(p: Promise<{ key?: { updatedAt?: unknown; identityId: string } }>) {
    try {
      const { key } = await p;
      return { identityId: key?.identityId, updatedAt: key?.updatedAt };
    } catch (err) {
      return Code[ConnectError.from(err).code];
    }
  }

  for (const principal of ["global", "scopedA", "scopedB"] as const) {
    describe(`a root key ${principal === "global" ? "with global permissions" : principal === "scopedA" ? "scoped to api_a" : "scoped to api_b"}`, () => {
      for (const row of MATRIX) {
        const outcome = row.expect[principal];
        it(`${row.rpc}, ${row.target}: ${outcome}`, async () => {
          const refused = outcome !== OK && outcome !== "VALID";
          const before = refused ? await snapshot() : null;
          expect(await outcomeOf(row.call(clients[principal], f))).toBe(outcome);
          if (before) expect(await snapshot(), "a refused call changes nothing").toEqual(before);
        });
      }
    });
  }
});
