/**
 * The verification cache cannot go back in time: a verification that read a
 * key before it was disabled, and finishes its credit spend after the change
 * feed evicted it and another verification cached the disabled key, must not
 * put its old copy back (issue 9, item 1). Driven by a gate in front of the
 * store's spendCredits, on both stores.
 */
import { afterEach, expect, it } from "vitest";
import { createHarness, unique, type Harness } from "../support/harness.js";
import { gatedStore, type GatedStore } from "./store-gates.js";
import { createIdentityWithKeys, createKey, credits, describeEachStore, verify } from "./support.js";

describeEachStore("a disabled key stays disabled while a spend that read it is in flight", (kind) => {
  let h: Harness | undefined;
  let gated!: GatedStore;

  async function setup(): Promise<Harness> {
    h = await createHarness({
      store: kind,
      wrapStore: (s) => {
        gated = gatedStore(s);
        return gated.store;
      },
    });
    return h;
  }

  afterEach(async () => {
    await h?.close();
    h = undefined;
  });

  it("answers DISABLED after a verification that read the key before the disable finishes spending its credits", async () => {
    const { admin } = await setup();
    const k = await createKey(admin, { credits: credits(1000) });
    expect((await verify(admin, k.plaintext)).codeName, "cached").toBe("VALID");

    // V1 read the (enabled) key from the cache and waits on its spend.
    const spend = gated.hold("spendCredits");
    const v1 = verify(admin, k.plaintext);
    await spend.reached;

    // The key is disabled; the change feed evicts it; V2 reloads and caches "disabled".
    await admin.keys.updateKey({ key: { id: k.id, enabled: false }, updateMask: { paths: ["enabled"] } });
    expect((await verify(admin, k.plaintext)).codeName, "V2").toBe("DISABLED");

    // V1 finishes: it began before the disable, so VALID is its right answer...
    spend.release();
    expect((await v1).codeName, "V1").toBe("VALID");
    // ...but the old copy it read must not come back.
    for (let i = 0; i < 3; i++) expect((await verify(admin, k.plaintext)).codeName, `after V1, verification ${i + 1}`).toBe("DISABLED");
  });

  it("shows an identity's new meta after a verification that read the identity before the change finishes spending its shared credits", async () => {
    const { admin } = await setup();
    const { identityId, keys } = await createIdentityWithKeys(admin, 1, { externalId: unique("org"), credits: credits(1000), meta: { plan: "free" } });
    expect((await verify(admin, keys[0])).identity?.meta).toEqual({ plan: "free" });

    const spend = gated.hold("spendCredits");
    const v1 = verify(admin, keys[0]);
    await spend.reached;
    await admin.identities.updateIdentity({ identity: { id: identityId, meta: { plan: "pro" } }, updateMask: { paths: ["meta"] } });
    expect((await verify(admin, keys[0])).identity?.meta, "V2").toEqual({ plan: "pro" });
    spend.release();
    await v1;
    for (let i = 0; i < 3; i++) expect((await verify(admin, keys[0])).identity?.meta, `after V1, verification ${i + 1}`).toEqual({ plan: "pro" });
  });
});
