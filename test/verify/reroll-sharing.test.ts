/**
 * RerollKey: during the grace period the old and the new key draw from one
 * balance and one set of rate-limit windows; after it only the new key works,
 * with what is left. In process on both stores.
 */
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { expect, it } from "vitest";
import { CreditsOperation } from "../../gen/latchkey/v1/key_service_pb.js";
import { useHarness } from "../support/harness.js";
import { count, createKey, credits, describeEachStore, limit, MINUTE, verify } from "./support.js";

describeEachStore("RerollKey shares the old key's balance and windows", (kind) => {
  const h = useHarness({ store: kind });
  const HOUR = 3_600_000;

  async function reroll(id: string, graceMs = HOUR): Promise<{ plaintext: string; id: string }> {
    const res = await h().admin.keys.rerollKey({ id, gracePeriod: durationFromMs(graceMs) });
    return { plaintext: res.plaintext, id: res.key!.id };
  }
  const remaining = async (id: string) => (await h().admin.keys.getKey({ id })).key!.credits?.remaining;

  it("gives old and new key 10 VALID together from 10 credits, used alternately", async () => {
    const c = h().admin;
    const old = await createKey(c, { credits: credits(10) });
    const next = await reroll(old.id);
    const codes: string[] = [];
    for (let i = 0; i < 30; i++) codes.push((await verify(c, i % 2 ? next.plaintext : old.plaintext)).codeName);
    expect(count(codes, "VALID")).toBe(10);
    expect(codes.slice(0, 10)).toEqual(Array(10).fill("VALID"));
    expect(await remaining(next.id)).toBe(0n);
    expect(await remaining(old.id), "the old key shows the balance it spends from").toBe(0n);
  });

  it("moves what is left at the reroll, and reports one balance on both keys", async () => {
    const c = h().admin;
    const old = await createKey(c, { credits: credits(10) });
    for (let i = 0; i < 3; i++) expect((await verify(c, old.plaintext)).codeName).toBe("VALID");
    const next = await reroll(old.id);
    expect((await c.keys.getKey({ id: next.id })).key!.credits!.remaining).toBe(7n);
    expect((await verify(c, old.plaintext)).creditsRemaining).toBe(6n);
    expect((await verify(c, next.plaintext)).creditsRemaining).toBe(5n);
    expect([await remaining(old.id), await remaining(next.id)]).toEqual([5n, 5n]);
  });

  it("admits exactly the balance from 40 concurrent verifications over both keys", async () => {
    const c = h().admin;
    const old = await createKey(c, { credits: credits(10) });
    const next = await reroll(old.id);
    const all = await Promise.all(Array.from({ length: 40 }, (_, i) => verify(c, i % 2 ? next.plaintext : old.plaintext)));
    expect(count(all.map((r) => r.codeName), "VALID")).toBe(10);
    expect(await remaining(next.id)).toBe(0n);
  });

  it("never admits more than the balance when verifications race the reroll itself", async () => {
    const c = h().admin;
    const old = await createKey(c, { credits: credits(20) });
    const during = Array.from({ length: 30 }, () => verify(c, old.plaintext));
    const next = await reroll(old.id);
    const after = Array.from({ length: 30 }, (_, i) => verify(c, i % 2 ? next.plaintext : old.plaintext));
    const codes = (await Promise.all([...during, ...after])).map((r) => r.codeName);
    expect(count(codes, "VALID")).toBe(20);
    expect(await remaining(next.id)).toBe(0n);
  });

  it("counts both keys against one set of windows: a key limit of 5 a minute admits 5 in all", async () => {
    const c = h().admin;
    const old = await createKey(c, { ratelimits: [limit("rpm", 5, MINUTE)] });
    for (let i = 0; i < 3; i++) expect((await verify(c, old.plaintext)).codeName).toBe("VALID");
    const next = await reroll(old.id);
    const codes: string[] = [];
    for (let i = 0; i < 6; i++) codes.push((await verify(c, i % 2 ? old.plaintext : next.plaintext)).codeName);
    expect(codes).toEqual(["VALID", "VALID", "RATE_LIMITED", "RATE_LIMITED", "RATE_LIMITED", "RATE_LIMITED"]);
  });

  it("keeps sharing along a chain of rerolls, and a top-up through any of them reaches the one balance", async () => {
    const c = h().admin;
    const first = await createKey(c, { credits: credits(4), ratelimits: [limit("rpm", 100, MINUTE)] });
    const second = await reroll(first.id);
    const third = await reroll(second.id);
    const keys = [first, second, third];
    await c.keys.updateCredits({ target: { case: "keyId", value: first.id }, operation: CreditsOperation.INCREMENT, value: 2n });
    const codes: string[] = [];
    for (let i = 0; i < 9; i++) codes.push((await verify(c, keys[i % 3].plaintext)).codeName);
    expect(count(codes, "VALID")).toBe(6);
    for (const k of keys) expect(await remaining(k.id)).toBe(0n);
    const last = await verify(c, third.plaintext);
    expect(last.ratelimits[0].remaining, "one window for the whole chain").toBe(100n - 6n);
  });

  it("leaves only the new key working after the grace period, with the balance", async () => {
    const c = h().admin;
    const old = await createKey(c, { credits: credits(5) });
    expect((await verify(c, old.plaintext)).codeName).toBe("VALID");
    const next = await reroll(old.id, 0);
    expect((await verify(c, old.plaintext)).codeName).toBe("EXPIRED");
    expect((await verify(c, next.plaintext)).creditsRemaining).toBe(3n);
  });

  it("gives the old key a balance of its own again when its credits are set", async () => {
    const c = h().admin;
    const old = await createKey(c, { credits: credits(5) });
    const next = await reroll(old.id);
    await c.keys.updateKey({ key: { id: old.id, credits: { remaining: 2n } }, updateMask: { paths: ["credits"] } });
    expect((await verify(c, old.plaintext)).creditsRemaining).toBe(1n);
    expect((await verify(c, next.plaintext)).creditsRemaining).toBe(4n);
  });
});
