/**
 * VerifyKey rate limits: identity pools shared by all keys of the identity, key
 * limits per key, override by name, auto-applied and request-named limits with
 * a cost, the per-limit report, and all-or-nothing spending. In process, over
 * the real routes and interceptors, on both stores (the memory counter).
 */
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { expect, it } from "vitest";
import { rpcError, unique, useHarness } from "../support/harness.js";
import {
  count,
  createIdentityWithKeys,
  createKey,
  credits,
  describeEachStore,
  limit,
  MINUTE,
  verify,
  verifyConcurrently,
} from "./support.js";

describeEachStore("VerifyKey rate limits", (kind) => {
  const h = useHarness({ store: kind });

  const sharedPool = () =>
    createIdentityWithKeys(h().admin, 3, { externalId: unique("org"), ratelimits: [limit("requests", 10, MINUTE, true)] });

  it("gives three keys of one identity exactly 10 VALID together from a 10-per-minute identity limit, whichever key is used", async () => {
    const { keys } = await sharedPool();
    const codes: string[] = [];
    // Uneven use: key 0 twice as often as the others.
    const order = [0, 0, 1, 2];
    for (let i = 0; i < 30; i++) codes.push((await verify(h().admin, keys[order[i % order.length]])).codeName);
    expect(codes.slice(0, 10)).toEqual(Array(10).fill("VALID"));
    expect(codes.slice(10)).toEqual(Array(20).fill("RATE_LIMITED"));
    // Every key is refused now, including one used least.
    for (const k of keys) expect((await verify(h().admin, k)).codeName).toBe("RATE_LIMITED");
  });

  it("gives exactly 10 VALID out of 30 concurrent verifications spread over the identity's three keys", async () => {
    const { keys } = await sharedPool();
    const codes = await verifyConcurrently(h().admin, keys, 30);
    expect(count(codes, "VALID")).toBe(10);
    expect(count(codes, "RATE_LIMITED")).toBe(20);
  });

  it("counts a key's own limit per key: using one key up leaves the other's untouched", async () => {
    const c = h().admin;
    const a = await createKey(c, { ratelimits: [limit("requests", 2, MINUTE)] });
    const b = await createKey(c, { ratelimits: [limit("requests", 2, MINUTE)] });
    expect([(await verify(c, a.plaintext)).codeName, (await verify(c, a.plaintext)).codeName, (await verify(c, a.plaintext)).codeName]).toEqual([
      "VALID",
      "VALID",
      "RATE_LIMITED",
    ]);
    expect([(await verify(c, b.plaintext)).codeName, (await verify(c, b.plaintext)).codeName, (await verify(c, b.plaintext)).codeName]).toEqual([
      "VALID",
      "VALID",
      "RATE_LIMITED",
    ]);
  });

  it("counts the same key limit per key also for keys of one identity", async () => {
    const c = h().admin;
    const { keys } = await createIdentityWithKeys(c, 2, { externalId: unique("user") }, { ratelimits: [limit("requests", 1, MINUTE)] });
    expect((await verify(c, keys[0])).codeName).toBe("VALID");
    expect((await verify(c, keys[0])).codeName).toBe("RATE_LIMITED");
    expect((await verify(c, keys[1])).codeName).toBe("VALID");
  });

  it("applies a key's limit instead of its identity's limit of the same name", async () => {
    const c = h().admin;
    const { identity } = await c.identities.createIdentity({ externalId: unique("org"), ratelimits: [limit("requests", 2, MINUTE)] });
    const own = await createKey(c, { identity: { case: "identityId", value: identity!.id }, ratelimits: [limit("requests", 5, MINUTE)] });
    const pooled = await createKey(c, { identity: { case: "identityId", value: identity!.id } });

    const first = await verify(c, own.plaintext);
    expect(first.ratelimits.map((r) => [r.name, r.limit, r.remaining])).toEqual([["requests", 5n, 4n]]);
    const codes = [first.codeName];
    for (let i = 0; i < 5; i++) codes.push((await verify(c, own.plaintext)).codeName);
    expect(codes).toEqual(["VALID", "VALID", "VALID", "VALID", "VALID", "RATE_LIMITED"]);
    // The key with its own limit never drew from the identity's pool.
    expect([(await verify(c, pooled.plaintext)).codeName, (await verify(c, pooled.plaintext)).codeName, (await verify(c, pooled.plaintext)).codeName]).toEqual([
      "VALID",
      "VALID",
      "RATE_LIMITED",
    ]);
  });

  it("applies a limit without auto_apply only when the request names it", async () => {
    const c = h().admin;
    const { plaintext } = await createKey(c, { ratelimits: [limit("expensive", 1, MINUTE, false)] });
    for (let i = 0; i < 3; i++) {
      const res = await verify(c, plaintext);
      expect(res.codeName).toBe("VALID");
      expect(res.ratelimits).toEqual([]);
    }
    const named = await verify(c, plaintext, { ratelimits: [{ name: "expensive" }] });
    expect(named.codeName).toBe("VALID");
    expect(named.ratelimits.map((r) => [r.name, r.remaining])).toEqual([["expensive", 0n]]);
    expect((await verify(c, plaintext, { ratelimits: [{ name: "expensive" }] })).codeName).toBe("RATE_LIMITED");
    expect((await verify(c, plaintext)).codeName, "unnamed, it still does not apply").toBe("VALID");
  });

  it("applies an identity's limit without auto_apply when the request names it, from the shared pool", async () => {
    const c = h().admin;
    const { keys } = await createIdentityWithKeys(c, 2, { externalId: unique("org"), ratelimits: [limit("exports", 2, MINUTE, false)] });
    const ask = { ratelimits: [{ name: "exports" }] };
    expect((await verify(c, keys[0], ask)).codeName).toBe("VALID");
    expect((await verify(c, keys[1], ask)).codeName).toBe("VALID");
    expect((await verify(c, keys[0], ask)).codeName).toBe("RATE_LIMITED");
    expect((await verify(c, keys[1], ask)).codeName).toBe("RATE_LIMITED");
    expect((await verify(c, keys[1])).codeName).toBe("VALID");
  });

  it("checks a named limit with cost 0 without spending from it", async () => {
    const c = h().admin;
    const { plaintext } = await createKey(c, { ratelimits: [limit("l", 2, MINUTE, false)] });
    const remaining = async (cost: bigint) => {
      const r = await verify(c, plaintext, { ratelimits: [{ name: "l", cost }] });
      return [r.codeName, r.ratelimits[0].remaining];
    };
    expect(await remaining(0n)).toEqual(["VALID", 2n]);
    expect(await remaining(0n)).toEqual(["VALID", 2n]);
    expect(await remaining(1n)).toEqual(["VALID", 1n]);
    expect(await remaining(0n)).toEqual(["VALID", 1n]);
    expect(await remaining(1n)).toEqual(["VALID", 0n]);
    // A check of an exhausted limit reports it as exhausted.
    expect(await remaining(0n)).toEqual(["RATE_LIMITED", 0n]);
  });

  it("spends a named limit's cost: cost 3 takes 3 tokens, and a cost larger than what is left is refused without spending", async () => {
    const c = h().admin;
    const { plaintext } = await createKey(c, { ratelimits: [limit("tokens", 10, MINUTE, false)] });
    const spend = async (cost: bigint) => {
      const r = await verify(c, plaintext, { ratelimits: [{ name: "tokens", cost }] });
      return [r.codeName, r.ratelimits[0].remaining];
    };
    expect(await spend(3n)).toEqual(["VALID", 7n]);
    expect(await spend(3n)).toEqual(["VALID", 4n]);
    expect(await spend(3n)).toEqual(["VALID", 1n]);
    expect(await spend(3n)).toEqual(["RATE_LIMITED", 1n]);
    expect(await spend(1n)).toEqual(["VALID", 0n]);
    expect(await spend(1n)).toEqual(["RATE_LIMITED", 0n]);
  });

  it("charges a cost to an auto-applied limit when the request names it", async () => {
    const c = h().admin;
    const { plaintext } = await createKey(c, { ratelimits: [limit("requests", 10, MINUTE, true)] });
    const r = await verify(c, plaintext, { ratelimits: [{ name: "requests", cost: 4n }] });
    expect(r.ratelimits.map((x) => [x.name, x.remaining])).toEqual([["requests", 6n]]);
    expect((await verify(c, plaintext)).ratelimits[0].remaining).toBe(5n);
  });

  it("rejects an unknown limit name as INVALID_ARGUMENT naming ratelimits[i].name", async () => {
    const c = h().admin;
    const { plaintext } = await createKey(c, { ratelimits: [limit("known", 5, MINUTE, false)] });
    const first = await rpcError(c.keys.verifyKey({ key: plaintext, ratelimits: [{ name: "nope" }] }));
    expect(first.code).toBe(3);
    expect(first.rawMessage).toMatch(/^ratelimits\[0\]\.name\b/);
    const second = await rpcError(c.keys.verifyKey({ key: plaintext, ratelimits: [{ name: "known" }, { name: "nope" }] }));
    expect(second.code).toBe(3);
    expect(second.rawMessage).toMatch(/^ratelimits\[1\]\.name\b/);
    // Nothing was spent by the refused requests.
    expect((await verify(c, plaintext, { ratelimits: [{ name: "known", cost: 0n }] })).ratelimits[0].remaining).toBe(5n);
  });

  it("reports every applied limit with its limit, remaining, reset_at and exceeded", async () => {
    const c = h().admin;
    const { identity } = await c.identities.createIdentity({
      externalId: unique("org"),
      ratelimits: [limit("org-burst", 2, 10_000, true), limit("org-named", 9, MINUTE, false)],
    });
    const { plaintext } = await createKey(c, {
      identity: { case: "identityId", value: identity!.id },
      ratelimits: [limit("key-minute", 3, MINUTE, true), limit("key-named", 4, MINUTE, false)],
    });
    // Windows are counted on the harness's counter clock.
    const before = h().counterClock.now;
    const res = await verify(c, plaintext, { ratelimits: [{ name: "key-named", cost: 2n }] });
    const after = h().counterClock.now;
    expect(res.codeName).toBe("VALID");
    const byName = Object.fromEntries(res.ratelimits.map((r) => [r.name, r]));
    expect(Object.keys(byName).sort()).toEqual(["key-minute", "key-named", "org-burst"]);
    expect([byName["key-minute"].limit, byName["key-minute"].remaining, byName["key-minute"].exceeded]).toEqual([3n, 2n, false]);
    expect([byName["key-named"].limit, byName["key-named"].remaining, byName["key-named"].exceeded]).toEqual([4n, 2n, false]);
    expect([byName["org-burst"].limit, byName["org-burst"].remaining, byName["org-burst"].exceeded]).toEqual([2n, 1n, false]);
    for (const [name, window] of [["key-minute", MINUTE], ["key-named", MINUTE], ["org-burst", 10_000]] as const) {
      const reset = timestampMs(byName[name].resetAt!);
      expect(reset, name).toBeGreaterThan(before);
      expect(reset, name).toBeLessThanOrEqual(after + window);
    }

    await verify(c, plaintext);
    const refused = await verify(c, plaintext);
    expect(refused.codeName).toBe("RATE_LIMITED");
    const refusedBy = Object.fromEntries(refused.ratelimits.map((r) => [r.name, r]));
    expect(refusedBy["org-burst"].exceeded).toBe(true);
    expect(refusedBy["org-burst"].remaining).toBe(0n);
    expect(refusedBy["key-minute"].exceeded).toBe(false);
    expect(refusedBy["key-minute"].remaining, "the refused call took nothing").toBe(1n);
  });

  it("spends neither the other limits nor credits when one limit refuses", async () => {
    const c = h().admin;
    const { identity } = await c.identities.createIdentity({ externalId: unique("org"), ratelimits: [limit("pool", 1, MINUTE, false)] });
    const { plaintext, id } = await createKey(c, {
      identity: { case: "identityId", value: identity!.id },
      ratelimits: [limit("own", 5, MINUTE, true)],
      credits: credits(10),
    });
    const ask = { ratelimits: [{ name: "pool" }] };
    const ok = await verify(c, plaintext, ask);
    expect(ok.codeName).toBe("VALID");
    expect(ok.creditsRemaining).toBe(9n);
    for (let i = 0; i < 3; i++) expect((await verify(c, plaintext, ask)).codeName).toBe("RATE_LIMITED");

    // "own" still has 4 (only the VALID call took one), credits still 9.
    const check = await verify(c, plaintext, { ratelimits: [{ name: "own", cost: 0n }], cost: 0n });
    expect(check.codeName).toBe("VALID");
    expect(check.ratelimits.map((r) => [r.name, r.remaining])).toEqual([["own", 4n]]);
    const { key } = await c.keys.getKey({ id });
    expect(key!.credits!.remaining).toBe(9n);
  });

  it("spends no limit tokens when the credits refuse", async () => {
    const c = h().admin;
    const { keys, identityId } = await createIdentityWithKeys(
      c,
      2,
      { externalId: unique("org"), ratelimits: [limit("pool", 5, MINUTE, true)] },
      { ratelimits: [limit("own", 5, MINUTE, true)], credits: credits(1) },
    );
    expect((await verify(c, keys[0])).codeName).toBe("VALID");
    for (let i = 0; i < 4; i++) {
      const refused = await verify(c, keys[0]);
      expect(refused.codeName).toBe("USAGE_EXCEEDED");
      expect(refused.ratelimits.every((r) => !r.exceeded)).toBe(true);
    }
    const check = await verify(c, keys[0], { ratelimits: [{ name: "own", cost: 0n }, { name: "pool", cost: 0n }], cost: 0n });
    expect(check.codeName).toBe("VALID");
    expect(Object.fromEntries(check.ratelimits.map((r) => [r.name, r.remaining]))).toEqual({ own: 4n, pool: 4n });
    // The identity's pool, seen from its other key, lost only the one VALID call.
    const other = await verify(c, keys[1], { ratelimits: [{ name: "own", cost: 0n }, { name: "pool", cost: 0n }], cost: 0n });
    expect(Object.fromEntries(other.ratelimits.map((r) => [r.name, r.remaining]))).toEqual({ own: 5n, pool: 4n });
    expect(identityId).toMatch(/^id_/);
  });

  it("keeps all-or-nothing under concurrency: refused calls leave the other limit and the credits exactly as the admitted ones left them", async () => {
    const c = h().admin;
    const { plaintext, id } = await createKey(c, {
      ratelimits: [limit("small", 5, MINUTE, true), limit("large", 100, MINUTE, true)],
      credits: credits(50),
    });
    const codes = await verifyConcurrently(c, [plaintext], 20);
    expect(count(codes, "VALID")).toBe(5);
    expect(count(codes, "RATE_LIMITED")).toBe(15);
    const check = await verify(c, plaintext, { ratelimits: [{ name: "large", cost: 0n }], cost: 0n });
    // "small" is auto-applied at cost 1 and is used up, so this check is refused; "large" shows what was spent.
    const large = check.ratelimits.find((r) => r.name === "large")!;
    expect(large.remaining).toBe(95n);
    const { key } = await c.keys.getKey({ id });
    expect(key!.credits!.remaining).toBe(45n);
  });
});
