/**
 * Exact admission and refunds into the right window, through VerifyKey: a call
 * is refused only when it alone does not fit, and tokens given back by a
 * refused verification go to the window they were taken from (or nowhere).
 * In process on both stores; the rollover case with a clock the test moves.
 */
import { afterEach, beforeEach, expect, it } from "vitest";
import { createVerificationCache } from "../../src/cache/verification-cache.js";
import { Principal } from "../../src/domain/access.js";
import { createVerifier, type VerifyInput } from "../../src/domain/verify.js";
import { createMemoryCounter } from "../../src/ratelimit/counter.js";
import { openTestStore, unique, useHarness, type StoreKind, type TestStore } from "../support/harness.js";
import { identityRecord, keyRecord } from "../support/records.js";
import { gated } from "./gates.js";
import { createIdentityWithKeys, createKey, describeEachStore, limit, MINUTE, verify } from "./support.js";

describeEachStore("VerifyKey rate limits: exact admission", (kind) => {
  const h = useHarness({ store: kind });

  it("admits a cost of 1 sent together with a cost of 5 when 9 of 10 are used: only the call that does not fit is refused", async () => {
    const c = h().admin;
    const { plaintext } = await createKey(c, { ratelimits: [limit("l", 10, MINUTE, false)] });
    expect((await verify(c, plaintext, { ratelimits: [{ name: "l", cost: 9n }] })).codeName).toBe("VALID");
    const [five, one] = await Promise.all([
      verify(c, plaintext, { ratelimits: [{ name: "l", cost: 5n }] }),
      verify(c, plaintext, { ratelimits: [{ name: "l", cost: 1n }] }),
    ]);
    expect([five.codeName, one.codeName]).toEqual(["RATE_LIMITED", "VALID"]);
    // The refused call reports what it found left: 1, or 0 if the other call came first.
    expect([0n, 1n]).toContain(five.ratelimits[0].remaining);
    expect(one.ratelimits[0].remaining).toBe(0n);
  });

  it("admits every call that fits while twenty that do not are refused around it", async () => {
    const c = h().admin;
    const { keys } = await createIdentityWithKeys(c, 2, { externalId: unique("org"), ratelimits: [limit("pool", 10, MINUTE, false)] });
    expect((await verify(c, keys[0], { ratelimits: [{ name: "pool", cost: 7n }] })).codeName).toBe("VALID");
    const calls = [
      ...Array.from({ length: 20 }, (_, i) => verify(c, keys[i % 2], { ratelimits: [{ name: "pool", cost: 4n }] })),
      verify(c, keys[0], { ratelimits: [{ name: "pool", cost: 2n }] }),
      verify(c, keys[1], { ratelimits: [{ name: "pool", cost: 1n }] }),
    ];
    const codes = (await Promise.all(calls)).map((r) => r.codeName);
    expect(codes).toEqual([...Array(20).fill("RATE_LIMITED"), "VALID", "VALID"]);
  });

  it("takes nothing from a limit that fits when another limit of the same call refuses", async () => {
    const c = h().admin;
    const { identity } = await c.identities.createIdentity({ externalId: unique("org"), ratelimits: [limit("pool", 2, MINUTE)] });
    const { plaintext } = await createKey(c, { identity: { case: "identityId", value: identity!.id }, ratelimits: [limit("own", 100, MINUTE)] });
    expect((await verify(c, plaintext)).codeName).toBe("VALID");
    expect((await verify(c, plaintext)).codeName).toBe("VALID");
    const refused = await verify(c, plaintext);
    expect(refused.codeName).toBe("RATE_LIMITED");
    const own = refused.ratelimits.find((r) => r.name === "own")!;
    expect([own.remaining, own.exceeded]).toEqual([98n, false]);
  });
});

/* The window a refund goes back to, with a clock the test moves. */

const VERIFY_ALL = new Principal("root_test", [{ action: "verify", apiId: null }]);
const input = (key: string): VerifyInput => ({ key, apiId: "", permissions: "", ratelimits: [], cost: null, tags: [] });

describeEachStore("VerifyKey refunds after a window rolled over", (kind: StoreKind) => {
  let ts: TestStore;
  beforeEach(async () => {
    ts = await openTestStore(kind);
  });
  afterEach(async () => {
    await ts.destroy();
  });

  it("gives a refused verification's token back to the window it was taken from, not to the next one", async () => {
    const clock = { now: Math.floor(Date.now() / MINUTE) * MINUTE + 30_000 };
    const now = () => clock.now;
    // One identity pool of 2 a minute; key A has an empty balance of its own, key B none.
    const identity = identityRecord({ ratelimits: [{ name: "pool", limit: 2, durationMs: MINUTE, autoApply: true }] });
    await ts.store.createIdentity(identity);
    const a = keyRecord({ identityId: identity.id, credits: { remaining: 0, refill: null } });
    const b = keyRecord({ identityId: identity.id });
    await ts.store.createKey(a.record);
    await ts.store.createKey(b.record);
    const counter = createMemoryCounter({ now });
    const { wrapped, gate } = gated(ts.store, "spendCredits");
    const cache = createVerificationCache({ store: wrapped, options: { maxEntries: 100, ttlMs: 600_000 }, now });
    const verify = createVerifier({ store: wrapped, cache, counter, now });

    // A takes a token in this window, then waits on its (refused) spend...
    const refused = verify(VERIFY_ALL, input(a.plaintext));
    await gate.arrived;
    // ...while the window rolls over and B uses the new window up (B has no credits: no spend).
    clock.now += MINUTE;
    const [b1, b2] = [await verify(VERIFY_ALL, input(b.plaintext)), await verify(VERIFY_ALL, input(b.plaintext))];
    expect([b1.code, b2.code]).toEqual(["VALID", "VALID"]);
    // Now A's spend is refused and its token given back.
    gate.release();
    expect((await refused).code).toBe("USAGE_EXCEEDED");
    // A's token went back to its own (old) window: the new window stays full.
    expect((await verify(VERIFY_ALL, input(b.plaintext))).code).toBe("RATE_LIMITED");
    expect((await counter.take(`i:${identity.id}:pool:${MINUTE}`, 0, 2, MINUTE)).total).toBe(2);
  });
});
