/**
 * Who may read usage: the `usage` permission (global for identities; global or
 * scoped to the key's api for keys). Root keys without it are PERMISSION_DENIED
 * even with every other permission; a key of an api outside the caller's scope
 * is NOT_FOUND, as is a deleted key to a scoped caller; no authorization is
 * UNAUTHENTICATED.
 */
import { Code } from "@connectrpc/connect";
import { beforeEach, describe, expect, it } from "vitest";
import type { Clients } from "../support/harness.js";
import { rpcError, unique } from "../support/harness.js";
import { HOUR, rawUsageFields, useUsageHarness } from "./support.js";

describe("usage query permissions", () => {
  const h = useUsageHarness("embedded");
  let identityId = "";
  let keyA = "";
  let keyB = "";

  beforeEach(async () => {
    const c = h().admin;
    const { identity } = await c.identities.createIdentity({ externalId: unique("org") });
    identityId = identity!.id;
    const a = await c.keys.createKey({ apiId: "api_a", identity: { case: "identityId", value: identityId } });
    const b = await c.keys.createKey({ apiId: "api_b", identity: { case: "identityId", value: identityId } });
    keyA = a.key!.id;
    keyB = b.key!.id;
    for (const k of [a.plaintext, a.plaintext, b.plaintext]) expect((await c.keys.verifyKey({ key: k })).valid).toBe(true);
    await h().core.recorder.flush();
  });

  const fields = () => rawUsageFields({ granularity: "HOUR", start: Date.now() - HOUR });
  const identityUsage = (c: Clients) => c.identities.getIdentityUsage({ lookup: { case: "id", value: identityId }, ...fields() });
  const keyUsage = (c: Clients, id: string) => c.keys.getKeyUsage({ id, ...fields() });
  const code = async (p: Promise<unknown>) => Code[(await rpcError(p)).code];

  it("answers both usage RPCs with the global usage permission alone", async () => {
    const c = await h().clientsWith("usage");
    expect((await identityUsage(c)).totals!.total).toBe(3n);
    expect((await keyUsage(c, keyA)).totals!.total).toBe(2n);
    expect((await keyUsage(c, keyB)).totals!.total).toBe(1n);
  });

  it("denies usage to a root key with every other permission", async () => {
    const c = await h().clientsWith("read", "write", "verify");
    expect(await code(identityUsage(c))).toBe("PermissionDenied");
    expect(await code(keyUsage(c, keyA))).toBe("PermissionDenied");
  });

  it("denies GetIdentityUsage to a root key whose usage permission is scoped to an api", async () => {
    const c = await h().clientsWith("usage:api_a");
    expect(await code(identityUsage(c))).toBe("PermissionDenied");
  });

  it("lets a root key scoped to an api read its keys' usage, and answers NOT_FOUND for keys of other apis", async () => {
    const c = await h().clientsWith("usage:api_a");
    expect((await keyUsage(c, keyA)).totals!.total).toBe(2n);
    expect(await code(keyUsage(c, keyB))).toBe("NotFound");
  });

  it("answers a deleted key's usage to a global usage permission and NOT_FOUND to a scoped one", async () => {
    await h().admin.keys.deleteKey({ id: keyA });
    expect((await keyUsage(await h().clientsWith("usage"), keyA)).totals!.total).toBe(2n);
    expect(await code(keyUsage(await h().clientsWith("usage:api_a"), keyA))).toBe("NotFound");
  });

  it("refuses a call without authorization as UNAUTHENTICATED", async () => {
    const c = h().clients(null);
    expect(await code(identityUsage(c))).toBe("Unauthenticated");
    expect(await code(keyUsage(c, keyA))).toBe("Unauthenticated");
  });
});
