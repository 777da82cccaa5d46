/**
 * Integration tier: what a write acknowledged over the wire is worth. The real
 * server process is stopped right after the last RPC returns — by `kill -9`
 * (no shutdown code runs) or SIGTERM — and restarted on the same store; every
 * acknowledged write is there, and the bootstrap root key is not printed again.
 * Runs on the embedded store and, when MONGODB_URI is set (CI starts FerretDB),
 * on MongoDB.
 */
import * as grpc from "@grpc/grpc-js";
import { afterAll, describe, expect, it } from "vitest";
import {
  dropMongoDatabase,
  grpcClients,
  grpcError,
  IN_CI,
  MONGODB_URI,
  runCli,
  startServer,
  tempDir,
  uniqueName,
  type ExitInfo,
  type Msg,
  type ServerProcess,
} from "./support.js";

interface Written {
  identity: Msg;
  kept: Msg[];
  /** Plaintext of the first kept key (10 credits, 3 spent) and of the deleted key. */
  plaintext: string;
  deleted: { id: string; plaintext: string };
}

/** Writes through every kind of mutation, then returns what a reader must find after a restart. */
async function writeThroughTheApi(server: ServerProcess, rootKey: string): Promise<Written> {
  const c = grpcClients(server.address);
  try {
    const ext = `org_01E4${uniqueName("d").replace(/_/g, "")}`;
    const { identity } = await c.call(c.identities, "CreateIdentity", { external_id: ext, meta: { fields: { plan: { stringValue: "free" } } } }, rootKey);
    const one = await c.call(c.keys, "CreateKey", { api_id: "api_durable", prefix: "dur", name: "one", external_id: ext, credits: { remaining: "10" } }, rootKey);
    const k1 = one.key;
    const k2 = (await c.call(c.keys, "CreateKey", { api_id: "api_durable", name: "two", identity_id: identity.id }, rootKey)).key;
    const three = await c.call(c.keys, "CreateKey", { api_id: "api_durable", name: "three", external_id: ext }, rootKey);
    const k3 = three.key;

    const updated = (
      await c.call(
        c.identities,
        "UpdateIdentity",
        { identity: { id: identity.id, meta: { fields: { plan: { stringValue: "pro" } } } }, update_mask: { paths: ["meta"] } },
        rootKey,
      )
    ).identity;
    expect(updated.meta.fields.plan.stringValue).toBe("pro");
    const { credits } = await c.call(c.keys, "UpdateCredits", { key_id: k1.id, operation: "CREDITS_OPERATION_DECREMENT", value: "3" }, rootKey);
    expect(credits.remaining).toBe("7");
    await c.call(c.keys, "DeleteKey", { id: k3.id }, rootKey);
    // The caller stops the process as soon as this returns.
    const renamed = (
      await c.call(c.keys, "UpdateKey", { key: { id: k2.id, name: "two-renamed" }, update_mask: { paths: ["name"] } }, rootKey)
    ).key;
    return {
      identity: updated,
      kept: [{ ...k1, credits, updated_at: undefined }, { ...renamed, updated_at: undefined }],
      plaintext: one.plaintext,
      deleted: { id: k3.id, plaintext: three.plaintext },
    };
  } finally {
    c.close();
  }
}

async function expectWritten(server: ServerProcess, rootKey: string, w: Written): Promise<void> {
  const c = grpcClients(server.address);
  try {
    const { identity } = await c.call(c.identities, "GetIdentity", { external_id: w.identity.external_id }, rootKey);
    expect(identity).toEqual(w.identity);

    const { keys } = await c.call(c.keys, "ListKeys", { external_id: w.identity.external_id }, rootKey);
    const byId = new Map<string, Msg>(keys.map((k: Msg) => [k.id, k]));
    expect([...byId.keys()].sort()).toEqual(w.kept.map((k) => k.id).sort());
    for (const k of w.kept) {
      const { key } = await c.call(c.keys, "GetKey", { id: k.id }, rootKey);
      expect({ ...key, updated_at: undefined }).toEqual(k);
      expect({ ...byId.get(k.id), updated_at: undefined }).toEqual(k);
    }
    expect(w.kept.map((k) => [k.name, k.identity_id, k.credits?.remaining ?? null])).toEqual([
      ["one", identity.id, "7"],
      ["two-renamed", identity.id, null],
    ]);

    const gone = await grpcError(c.call(c.keys, "GetKey", { id: w.deleted.id }, rootKey));
    expect(gone.code).toBe(grpc.status.NOT_FOUND);
  } finally {
    c.close();
  }
}

/** The stored hashes still match the plaintexts handed out before the restart. */
async function expectVerifiable(server: ServerProcess, rootKey: string, w: Written): Promise<void> {
  const c = grpcClients(server.address);
  try {
    const ok = await c.call(c.keys, "VerifyKey", { key: w.plaintext, api_id: "api_durable" }, rootKey);
    expect(ok).toMatchObject({ valid: true, code: "VERIFICATION_CODE_VALID", key_id: w.kept[0].id, credits_remaining: "6" });
    expect(ok.identity).toMatchObject({ id: w.identity.id, external_id: w.identity.external_id });
    const deleted = await c.call(c.keys, "VerifyKey", { key: w.deleted.plaintext, api_id: "api_durable" }, rootKey);
    expect(deleted).toMatchObject({ valid: false, code: "VERIFICATION_CODE_NOT_FOUND" });
  } finally {
    c.close();
  }
}

interface StoreCase {
  name: string;
  available: boolean;
  /** Environment of a fresh store for one test; the same object restarts on the same store. */
  fresh(): Record<string, string>;
  cleanup(env: Record<string, string>): Promise<void>;
}

const STORES: StoreCase[] = [
  {
    name: "embedded",
    available: true,
    fresh: () => ({ LATCHKEY_DATA_DIR: tempDir("durable") }),
    cleanup: async () => undefined,
  },
  {
    name: "mongodb",
    available: MONGODB_URI !== "",
    fresh: () => ({ MONGODB_URI, LATCHKEY_MONGODB_DATABASE: uniqueName("lk_it_durable") }),
    cleanup: (env) => dropMongoDatabase(env.LATCHKEY_MONGODB_DATABASE),
  },
];

const STOPS: { how: string; signal: NodeJS.Signals; exit: ExitInfo }[] = [
  { how: "kill -9", signal: "SIGKILL", exit: { code: null, signal: "SIGKILL" } },
  { how: "SIGTERM", signal: "SIGTERM", exit: { code: 0, signal: null } },
];

describe.each(STORES)("restarts on the $name store", (store) => {
  const envs: Record<string, string>[] = [];
  const servers: ServerProcess[] = [];

  afterAll(async () => {
    for (const s of servers) await s.kill("SIGKILL");
    for (const env of envs) await store.cleanup(env);
  });

  const test = store.available ? it : IN_CI ? it : it.skip;

  test.each(STOPS)("keeps every acknowledged write across $how, and prints the bootstrap key only once", async ({ signal, exit }) => {
    if (!store.available) throw new Error("MONGODB_URI must be set in CI (.ci/run starts FerretDB)");
    const env = store.fresh();
    envs.push(env);

    const first = await startServer({ env });
    servers.push(first);
    expect(first.bootstrapKey, "a fresh store prints a bootstrap root key").toMatch(/^lkroot_/);
    const bootstrapKey = first.bootstrapKey!;
    const written = await writeThroughTheApi(first, bootstrapKey);
    expect(await first.kill(signal)).toEqual(exit);

    // A root key made with the CLI while the server is down works after the restart.
    const made = await runCli(["root-keys", "create", "--name", "durability-reader", "--permission", "read"], env);
    expect(made.code, made.stderr).toBe(0);
    const cliKey = JSON.parse(made.stdout) as { key: string; permissions: string[] };
    expect(cliKey.key).toMatch(/^lkroot_/);

    const second = await startServer({ env });
    servers.push(second);
    expect(second.bootstrapKey).toBeNull();
    expect(second.stdout() + second.stderr()).not.toMatch(/lkroot_/);

    await expectWritten(second, bootstrapKey, written);
    await expectWritten(second, cliKey.key, written);
    await expectVerifiable(second, bootstrapKey, written);

    // The read-only CLI key cannot write.
    const c = grpcClients(second.address);
    try {
      const denied = await grpcError(c.call(c.identities, "CreateIdentity", { external_id: "user_denied" }, cliKey.key));
      expect(denied.code).toBe(grpc.status.PERMISSION_DENIED);
    } finally {
      c.close();
    }

    const listed = await runCli(["root-keys", "list"], env);
    expect(listed.code, listed.stderr).toBe(0);
    const names = listed.stdout
      .trim()
      .split("\n")
      .map((l) => (JSON.parse(l) as { name: string }).name);
    expect(names.sort()).toEqual(["bootstrap", "durability-reader"]);

    expect(await second.stop()).toEqual({ code: 0, signal: null });
  });
});
