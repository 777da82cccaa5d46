import { Code } from "@connectrpc/connect";
import { beforeEach, describe, expect, it } from "vitest";
import type { Identity } from "../../gen/latchkey/v1/identity_pb.js";
import type { Key } from "../../gen/latchkey/v1/key_pb.js";
import { CreditsOperation } from "../../gen/latchkey/v1/key_service_pb.js";
import { UnavailableError } from "../../src/domain/errors.js";
import { newId } from "../../src/domain/ids.js";
import { generateKey, hashKey } from "../../src/domain/key-format.js";
import { ROOT_KEY_PREFIX } from "../../src/domain/root-keys.js";
import type { Store } from "../../src/storage/store.js";
import { createHarness, expectRefused, rpcError, unique, useHarness, type Clients, type Harness } from "../support/harness.js";
import { mask } from "../support/proto.js";

/*
 * One table of every identity and key RPC (VerifyKey and the usage RPCs have
 * their own suites), run through every authorization case.
 */

interface Fixture {
  identity: Identity;
  /** A key of API_A, linked to `identity`. */
  keyA: Key;
  keyAPlaintext: string;
  /** A key of API_B. */
  keyB: Key;
}

const API_A = "api_a";
const API_B = "api_b";

type Call = (c: Clients, f: Fixture) => Promise<unknown>;

interface Rpc {
  name: string;
  action: "read" | "write";
  /** A valid request; where keys are involved, on API_A. */
  call: Call;
  /** For key RPCs: the same request on API_B, and what a root key scoped to API_A gets for it. */
  onB?: { call: Call; code: Code };
}

const RPCS: Rpc[] = [
  { name: "CreateIdentity", action: "write", call: (c) => c.identities.createIdentity({ externalId: unique("new") }) },
  { name: "GetIdentity", action: "read", call: (c, f) => c.identities.getIdentity({ lookup: { case: "id", value: f.identity.id } }) },
  {
    name: "GetIdentity by external_id",
    action: "read",
    call: (c, f) => c.identities.getIdentity({ lookup: { case: "externalId", value: f.identity.externalId } }),
  },
  { name: "ListIdentities", action: "read", call: (c) => c.identities.listIdentities({}) },
  {
    name: "UpdateIdentity",
    action: "write",
    call: (c, f) => c.identities.updateIdentity({ identity: { id: f.identity.id, meta: { changed: true } }, updateMask: mask("meta") }),
  },
  { name: "DeleteIdentity", action: "write", call: (c, f) => c.identities.deleteIdentity({ lookup: { case: "id", value: f.identity.id } }) },
  {
    name: "UpdateCredits of an identity",
    action: "write",
    call: (c, f) => c.keys.updateCredits({ target: { case: "identityId", value: f.identity.id }, operation: CreditsOperation.SET, value: 1n }),
  },
  {
    name: "CreateKey",
    action: "write",
    call: (c) => c.keys.createKey({ apiId: API_A }),
    onB: { call: (c) => c.keys.createKey({ apiId: API_B }), code: Code.PermissionDenied },
  },
  {
    name: "GetKey",
    action: "read",
    call: (c, f) => c.keys.getKey({ id: f.keyA.id }),
    onB: { call: (c, f) => c.keys.getKey({ id: f.keyB.id }), code: Code.NotFound },
  },
  {
    name: "ListKeys",
    action: "read",
    call: (c) => c.keys.listKeys({ apiId: API_A }),
    onB: { call: (c) => c.keys.listKeys({ apiId: API_B }), code: Code.PermissionDenied },
  },
  {
    name: "UpdateKey",
    action: "write",
    call: (c, f) => c.keys.updateKey({ key: { id: f.keyA.id, name: "changed" }, updateMask: mask("name") }),
    onB: { call: (c, f) => c.keys.updateKey({ key: { id: f.keyB.id, name: "changed" }, updateMask: mask("name") }), code: Code.NotFound },
  },
  {
    name: "DeleteKey",
    action: "write",
    call: (c, f) => c.keys.deleteKey({ id: f.keyA.id }),
    onB: { call: (c, f) => c.keys.deleteKey({ id: f.keyB.id }), code: Code.NotFound },
  },
  {
    name: "RerollKey",
    action: "write",
    call: (c, f) => c.keys.rerollKey({ id: f.keyA.id }),
    onB: { call: (c, f) => c.keys.rerollKey({ id: f.keyB.id }), code: Code.NotFound },
  },
  {
    name: "UpdateCredits of a key",
    action: "write",
    call: (c, f) => c.keys.updateCredits({ target: { case: "keyId", value: f.keyA.id }, operation: CreditsOperation.SET, value: 1n }),
    onB: {
      call: (c, f) => c.keys.updateCredits({ target: { case: "keyId", value: f.keyB.id }, operation: CreditsOperation.SET, value: 1n }),
      code: Code.NotFound,
    },
  },
];

const KEY_RPCS = RPCS.filter((r) => r.onB);
const GLOBAL_RPCS = RPCS.filter((r) => !r.onB);

describe("authorization of every identity and key RPC", () => {
  const h = useHarness();
  let f: Fixture;
  beforeEach(async () => {
    const { identity } = await h().admin.identities.createIdentity({ externalId: unique("owner") });
    const a = await h().admin.keys.createKey({ apiId: API_A, identity: { case: "identityId", value: identity!.id } });
    const b = await h().admin.keys.createKey({ apiId: API_B });
    f = { identity: identity!, keyA: a.key!, keyAPlaintext: a.plaintext, keyB: b.key! };
  });

  /** Authorization headers that must all be refused as UNAUTHENTICATED. */
  const BAD_CREDENTIALS: [string, (h: Harness) => Promise<string>][] = [
    ["an empty bearer token", async () => "Bearer "],
    ["a Basic header", async () => "Basic dXNlcjpwYXNz"],
    ["the bare root key without Bearer", async (h) => h.rootKey],
    ["a malformed token", async () => "Bearer not-a-root-key"],
    ["two tokens", async (h) => `Bearer ${h.rootKey} ${h.rootKey}`],
    ["the root key with one character changed", async (h) => `Bearer ${changeOneChar(h.rootKey)}`],
    ["a well-formed root key that was never issued", async () => `Bearer ${generateKey(ROOT_KEY_PREFIX, 24).plaintext}`],
    ["a revoked root key", async (h) => `Bearer ${await revokedRootKey(h)}`],
    ["a customer API key", async () => `Bearer ${f.keyAPlaintext}`],
    ["the root key's stored hash", async (h) => `Bearer ${hashKey(h.rootKey)}`],
  ];

  describe.each(RPCS)("$name", (rpc) => {
    it("answers UNAUTHENTICATED without an authorization header, and writes nothing", async () => {
      await expectRefused(h(), () => rpc.call(h().clients(null), f), Code.Unauthenticated);
    });

    it.each(BAD_CREDENTIALS)("answers UNAUTHENTICATED to %s, and writes nothing", async (_what, header) => {
      const clients = h().clientsWithHeader(await header(h()));
      await expectRefused(h(), () => rpc.call(clients, f), Code.Unauthenticated);
    });

    it(`answers PERMISSION_DENIED to a root key without "${rpc.action}", and writes nothing`, async () => {
      const denied = [[rpc.action === "read" ? "write" : "read"], ["verify", "usage"]];
      // Identity RPCs need a global grant: grants for every api are not enough.
      if (!rpc.onB) denied.push([`${rpc.action}:${API_A}`, `${rpc.action}:${API_B}`]);
      for (const perms of denied) {
        const clients = await h().clientsWith(...perms);
        await expectRefused(h(), () => rpc.call(clients, f), Code.PermissionDenied);
      }
    });

    it(`succeeds with just the global "${rpc.action}" permission`, async () => {
      await rpc.call(await h().clientsWith(rpc.action), f);
    });

    it("accepts the bearer scheme in any case", async () => {
      await rpc.call(h().clientsWithHeader(`bearer ${h().rootKey}`), f);
    });
  });

  describe("a root key scoped to one api", () => {
    it.each(KEY_RPCS)("may $name on its api", async (rpc) => {
      const clients = await h().clientsWith(`read:${API_A}`, `write:${API_A}`);
      await rpc.call(clients, f);
    });

    it.each(KEY_RPCS)("gets the documented refusal for $name on another api, and writes nothing", async (rpc) => {
      const clients = await h().clientsWith(`read:${API_A}`, `write:${API_A}`);
      await expectRefused(h(), () => rpc.onB!.call(clients, f), rpc.onB!.code);
    });

    it.each(GLOBAL_RPCS)("gets PERMISSION_DENIED for $name, and writes nothing", async (rpc) => {
      const clients = await h().clientsWith(`read:${API_A}`, `write:${API_A}`);
      await expectRefused(h(), () => rpc.call(clients, f), Code.PermissionDenied);
    });

    it("cannot tell a key of another api from a key that does not exist", async () => {
      const clients = await h().clientsWith(`read:${API_A}`, `write:${API_A}`);
      const other = await rpcError(clients.keys.getKey({ id: f.keyB.id }));
      const missing = await rpcError(clients.keys.getKey({ id: newId("key") }));
      expect(other.code).toBe(Code.NotFound);
      expect(other.rawMessage).toBe(missing.rawMessage);
    });

    it("must name its api to list keys", async () => {
      const clients = await h().clientsWith(`read:${API_A}`);
      await expectRefused(h(), () => clients.keys.listKeys({}), Code.PermissionDenied);
      await expectRefused(h(), () => clients.keys.listKeys({ identityId: f.identity.id }), Code.PermissionDenied);
      await expectRefused(h(), () => clients.keys.listKeys({ externalId: f.identity.externalId }), Code.PermissionDenied);
      const own = await clients.keys.listKeys({ apiId: API_A, externalId: f.identity.externalId });
      expect(own.keys.map((k) => k.id)).toEqual([f.keyA.id]);
    });

    it("sees only its api's keys of an identity", async () => {
      await h().admin.keys.updateKey({ key: { id: f.keyB.id, identityId: f.identity.id }, updateMask: mask("identity_id") });
      const clients = await h().clientsWith(`read:${API_A}`);
      const res = await clients.keys.listKeys({ apiId: API_A, identityId: f.identity.id });
      expect(res.keys.map((k) => k.id)).toEqual([f.keyA.id]);
    });

    it("may read but not write its api with only read", async () => {
      const clients = await h().clientsWith(`read:${API_A}`);
      await clients.keys.getKey({ id: f.keyA.id });
      await expectRefused(h(), () => clients.keys.createKey({ apiId: API_A }), Code.PermissionDenied);
      await expectRefused(h(), () => clients.keys.deleteKey({ id: f.keyA.id }), Code.PermissionDenied);
    });
  });

  it("gives the same answer for a wrong, a changed and a revoked root key", async () => {
    const messages = new Set<string>();
    for (const header of [
      `Bearer ${generateKey(ROOT_KEY_PREFIX, 24).plaintext}`,
      `Bearer ${changeOneChar(h().rootKey)}`,
      `Bearer ${await revokedRootKey(h())}`,
    ]) {
      messages.add((await rpcError(h().clientsWithHeader(header).keys.getKey({ id: f.keyA.id }))).rawMessage);
    }
    expect(messages.size).toBe(1);
  });
});

describe("errors the server cannot attribute to the request", () => {
  /** A harness whose store fails `method` with `error` once armed. */
  async function failingHarness(method: keyof Store, error: Error) {
    let armed = false;
    const h = await createHarness({
      wrapStore: (store) =>
        new Proxy(store, {
          get(target, prop, receiver) {
            if (armed && prop === method) {
              return async () => {
                throw error;
              };
            }
            const v = Reflect.get(target, prop, receiver);
            return typeof v === "function" ? v.bind(target) : v;
          },
        }),
    });
    return { h, arm: () => (armed = true) };
  }

  it("answers INTERNAL with a generic message, and logs the cause with the request id", async () => {
    const secret = "mongodb://admin:hunter2@db.internal:27017 at /srv/latchkey/src/storage/mongodb/mongo-store.ts:212";
    const { h, arm } = await failingHarness("getIdentity", new Error(secret));
    try {
      const { identity } = await h.admin.identities.createIdentity({ externalId: unique("u") });
      arm();
      const err = await rpcError(
        h.admin.identities.getIdentity({ lookup: { case: "id", value: identity!.id } }, { headers: { "x-request-id": "req-leak-test" } }),
      );
      expect(err.code).toBe(Code.Internal);
      expect(err.rawMessage).toBe("internal error");
      const everything = JSON.stringify({ message: err.message, metadata: [...err.metadata], details: err.details, cause: String(err.cause) });
      for (const leak of ["hunter2", "db.internal", "mongo-store.ts", "/srv/", "Error:"]) expect(everything).not.toContain(leak);

      const logged = h.logs.filter((l) => l.includes("req-leak-test"));
      expect(logged.length).toBeGreaterThan(0);
      expect(logged.join("\n")).toContain("hunter2");
    } finally {
      await h.close();
    }
  });

  it("answers INTERNAL for a programming error inside a handler without leaking it", async () => {
    const { h, arm } = await failingHarness("getKey", new TypeError("Cannot read properties of undefined (reading 'secretColumn')"));
    try {
      const { key } = await h.admin.keys.createKey({ apiId: API_A });
      arm();
      const err = await rpcError(h.admin.keys.getKey({ id: key!.id }));
      expect(err.code).toBe(Code.Internal);
      expect(err.rawMessage).not.toContain("secretColumn");
    } finally {
      await h.close();
    }
  });

  it("answers UNAVAILABLE when the store is unreachable", async () => {
    const { h, arm } = await failingHarness("listKeys", new UnavailableError("mongodb: MongoServerSelectionError"));
    try {
      arm();
      const err = await rpcError(h.admin.keys.listKeys({ apiId: API_A }));
      expect(err.code).toBe(Code.Unavailable);
    } finally {
      await h.close();
    }
  });
});

function changeOneChar(key: string): string {
  const i = key.length - 3;
  const c = key[i] === "a" ? "b" : "a";
  return key.slice(0, i) + c + key.slice(i + 1);
}

async function revokedRootKey(h: Harness): Promise<string> {
  const plaintext = await h.createRootKey("*");
  const rec = await h.store.getRootKeyByHash(hashKey(plaintext));
  expect(await h.store.deleteRootKey(rec!.id)).toBe(true);
  return plaintext;
}
