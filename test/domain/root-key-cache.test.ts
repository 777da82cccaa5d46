import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { ResourceExhaustedError, UnauthenticatedError, UnavailableError } from "../../src/domain/errors.js";
import { generateKey } from "../../src/domain/key-format.js";
import { createRootKey, createRootKeyAuthenticator, ROOT_KEY_PREFIX, type RootKeyCacheLimits } from "../../src/domain/root-keys.js";
import type { Store } from "../../src/storage/store.js";
import { openTestStore, type TestStore } from "../support/harness.js";

/*
 * The root-key authenticator against a real (embedded) store whose lookups are
 * counted, on a clock the test moves: made-up keys with valid checksums can
 * neither evict valid keys nor cost a store lookup each.
 */

const CACHE_MS = 5000;
const madeUp = () => generateKey(ROOT_KEY_PREFIX, 24).plaintext;
const bearer = (key: string) => `Bearer ${key}`;

describe("root-key authentication under a flood of made-up keys", () => {
  let ts: TestStore;
  let lookups: string[];
  let failLookups: boolean;
  let clock: number;
  let store: Store;

  beforeEach(async () => {
    ts = await openTestStore("embedded");
    lookups = [];
    failLookups = false;
    clock = 1_000_000;
    store = new Proxy(ts.store, {
      get(target, prop, receiver) {
        if (prop === "getRootKeyByHash") {
          return async (hash: string) => {
            lookups.push(hash);
            if (failLookups) throw new UnavailableError("store down");
            return target.getRootKeyByHash(hash);
          };
        }
        const v = Reflect.get(target, prop, receiver);
        return typeof v === "function" ? v.bind(target) : v;
      },
    });
  });
  afterEach(() => ts.destroy());

  const authenticator = (limits: RootKeyCacheLimits) => createRootKeyAuthenticator({ store, cacheMs: CACHE_MS, now: () => clock, limits });
  const realKey = async () => (await createRootKey(ts.store, "real", [{ action: "read", apiId: null }]))!.plaintext;

  async function refusal(p: Promise<unknown>): Promise<string> {
    try {
      await p;
    } catch (err) {
      return (err as Error).constructor.name;
    }
    return "accepted";
  }

  it("keeps a valid root key remembered while more made-up keys than the cache holds are tried", async () => {
    // The default limits, and a cache time longer than the test's clock moves.
    const auth = createRootKeyAuthenticator({ store, cacheMs: 3_600_000, now: () => clock });
    const key = await realKey();
    await auth(bearer(key));
    expect(lookups).toHaveLength(1);
    const flood = 10_100; // more than the 10,000 entries the root-key cache holds
    for (let sent = 0; sent < flood; sent += 100) {
      clock += 1000; // the lookup budget refills: every made-up key is looked up and remembered
      const answers = await Promise.all(Array.from({ length: 100 }, () => refusal(auth(bearer(madeUp())))));
      expect(new Set(answers)).toEqual(new Set([UnauthenticatedError.name]));
    }
    expect(lookups).toHaveLength(1 + flood);
    lookups = [];
    expect((await auth(bearer(key))).rootKeyId).toMatch(/^root_/);
    expect(lookups, "the valid key was not evicted: no new lookup").toEqual([]);
  });

  it("looks a made-up key up once while it is remembered as unknown", async () => {
    const auth = authenticator({ validEntries: 10, invalidEntries: 50, unknownLookupsPerSecond: 100 });
    const fake = madeUp();
    for (let i = 0; i < 200; i++) expect(await refusal(auth(bearer(fake)))).toBe(UnauthenticatedError.name);
    expect(lookups).toHaveLength(1);
    clock += CACHE_MS + 1;
    await refusal(auth(bearer(fake)));
    expect(lookups).toHaveLength(2);
  });

  it("shares one lookup among concurrent checks of the same unknown key", async () => {
    const auth = authenticator({ validEntries: 10, invalidEntries: 50, unknownLookupsPerSecond: 1 });
    const fake = madeUp();
    const results = await Promise.all(Array.from({ length: 20 }, () => refusal(auth(bearer(fake)))));
    expect(new Set(results)).toEqual(new Set([UnauthenticatedError.name]));
    expect(lookups).toHaveLength(1);
  });

  it("costs at most the lookup budget per second however many distinct made-up keys arrive", async () => {
    const auth = authenticator({ validEntries: 10, invalidEntries: 10_000, unknownLookupsPerSecond: 20 });
    const first = await Promise.all(Array.from({ length: 1000 }, () => refusal(auth(bearer(madeUp())))));
    expect(lookups).toHaveLength(20);
    expect(first.filter((r) => r === UnauthenticatedError.name)).toHaveLength(20);
    expect(first.filter((r) => r === ResourceExhaustedError.name)).toHaveLength(980);
    clock += 500; // half a second: half the budget is back
    await Promise.all(Array.from({ length: 1000 }, () => refusal(auth(bearer(madeUp())))));
    expect(lookups).toHaveLength(30);
  });

  it("still lets in, and rechecks, a root key seen valid while a flood has spent the budget", async () => {
    const auth = authenticator({ validEntries: 10, invalidEntries: 50, unknownLookupsPerSecond: 5 });
    const key = await realKey();
    await auth(bearer(key));
    await Promise.all(Array.from({ length: 100 }, () => refusal(auth(bearer(madeUp())))));
    clock += CACHE_MS + 1; // its entry is due for a recheck; the flood goes on
    await Promise.all(Array.from({ length: 100 }, () => refusal(auth(bearer(madeUp())))));
    lookups = [];
    expect((await auth(bearer(key))).rootKeyId).toMatch(/^root_/);
    expect(lookups, "rechecked in the store, outside the budget").toHaveLength(1);
  });

  it("answers a new root key RESOURCE_EXHAUSTED while the budget is spent, and lets it in once it refills", async () => {
    const auth = authenticator({ validEntries: 10, invalidEntries: 50, unknownLookupsPerSecond: 5 });
    await Promise.all(Array.from({ length: 10 }, () => refusal(auth(bearer(madeUp())))));
    const key = await realKey();
    expect(await refusal(auth(bearer(key)))).toBe(ResourceExhaustedError.name);
    clock += 200; // one token back
    expect((await auth(bearer(key))).rootKeyId).toMatch(/^root_/);
  });

  it("stops accepting a revoked root key once its entry is due, and remembers it as unknown", async () => {
    const auth = authenticator({ validEntries: 10, invalidEntries: 50, unknownLookupsPerSecond: 5 });
    const key = await realKey();
    await auth(bearer(key));
    const rec = (await ts.store.listRootKeys())[0];
    await ts.store.deleteRootKey(rec.id);
    expect((await auth(bearer(key))).rootKeyId).toBe(rec.id); // within cacheMs
    clock += CACHE_MS + 1;
    expect(await refusal(auth(bearer(key)))).toBe(UnauthenticatedError.name);
    expect(await refusal(auth(bearer(key)))).toBe(UnauthenticatedError.name);
    expect(lookups).toHaveLength(2);
  });

  it("answers without a promise (cached) only a header checked valid and still within its cache time", async () => {
    const auth = authenticator({ validEntries: 10, invalidEntries: 50, unknownLookupsPerSecond: 5 });
    const key = await realKey();
    const other = await realKey();
    expect(auth.cached(bearer(key))).toBeUndefined(); // never checked
    expect(auth.cached(null)).toBeUndefined();
    const principal = await auth(bearer(key));
    expect(auth.cached(bearer(key))).toBe(principal);
    expect(auth.cached(bearer(other))).toBeUndefined();
    await auth(bearer(other));
    expect(auth.cached(bearer(key))).toBeUndefined(); // the last header only: the full check answers the rest
    expect(auth.cached(bearer(other))?.rootKeyId).not.toBe(principal.rootKeyId);
    // A made-up key after a valid one: not answered from the valid key's entry.
    expect(await refusal(auth(bearer(madeUp())))).toBe(UnauthenticatedError.name);
    expect(auth.cached(bearer(other))).toBeUndefined();
    // Revoked: once the entry is due, the cached answer stops and the full check refuses.
    await auth(bearer(key));
    const rec = (await ts.store.listRootKeys()).find((r) => r.id === principal.rootKeyId)!;
    await ts.store.deleteRootKey(rec.id);
    expect(auth.cached(bearer(key))).toBe(principal);
    clock += CACHE_MS + 1;
    expect(auth.cached(bearer(key))).toBeUndefined();
    expect(await refusal(auth(bearer(key)))).toBe(UnauthenticatedError.name);
    expect(auth.cached(bearer(key))).toBeUndefined();
  });

  it("refuses malformed keys and bad checksums without a lookup or a budget token", async () => {
    const auth = authenticator({ validEntries: 10, invalidEntries: 50, unknownLookupsPerSecond: 1 });
    const key = madeUp();
    for (const bad of [key.slice(0, -1) + (key.endsWith("a") ? "b" : "a"), "lkroot_abc", "sk_" + key.slice(7), "x".repeat(10_000)]) {
      expect(await refusal(auth(bearer(bad)))).toBe(UnauthenticatedError.name);
    }
    expect(lookups).toEqual([]);
    expect(await refusal(auth(bearer(madeUp())))).toBe(UnauthenticatedError.name); // the one token is still there
  });

  it("remembers nothing when the store fails, so the next check looks again", async () => {
    const auth = authenticator({ validEntries: 10, invalidEntries: 50, unknownLookupsPerSecond: 100 });
    const key = await realKey();
    failLookups = true;
    expect(await refusal(auth(bearer(key)))).toBe(UnavailableError.name);
    failLookups = false;
    expect((await auth(bearer(key))).rootKeyId).toMatch(/^root_/);
  });
});
