/**
 * Credits admitted on trust while the store cannot be reached
 * (LATCHKEY_OUTAGE_CREDIT_ALLOWANCE, the `store` credits backend), in process
 * and deterministic: an instance (createCore over createRouterTransport) on a
 * store that can be taken away — every call, ping included, then fails as an
 * unreachable store's does — and the guard told so by a failed probe. No
 * sleeps: the store comes back with a probe, and the test awaits the
 * reconciliation the instance starts then.
 */
import { createClient, createRouterTransport, ConnectError, Code, type Interceptor } from "@connectrpc/connect";
import { Writable } from "node:stream";
import { afterEach, describe, expect, it } from "vitest";
import { IdentityService } from "../../gen/latchkey/v1/identity_service_pb.js";
import { KeyService } from "../../gen/latchkey/v1/key_service_pb.js";
import { DEFAULT_CORE_OPTIONS, createCore, type Core, type CoreOptions } from "../../src/app/compose.js";
import { parseRootPermission } from "../../src/domain/access.js";
import { StoreUnreachableError } from "../../src/domain/errors.js";
import { hashKey } from "../../src/domain/key-format.js";
import { createOutageCredits } from "../../src/domain/outage-credits.js";
import { createRootKey } from "../../src/domain/root-keys.js";
import type { Credits } from "../../src/domain/types.js";
import { createLogger } from "../../src/observability/logger.js";
import { createMetrics, type Metrics } from "../../src/observability/metrics.js";
import type { Store } from "../../src/storage/store.js";
import { openTestStore, unique, type Clients, type TestStore } from "../support/harness.js";
import { createIdentityWithKeys, createKey, credits, describeEachStore, verify } from "../verify/support.js";

const lines: string[] = [];
const logger = createLogger(
  "info",
  new Writable({
    write: (c, _e, done) => {
      lines.push(String(c));
      done();
    },
  }),
);

/** A store that can go away (every call fails as an unreachable store's), and whose next call of a method can be made to fail once. */
function outageStore(real: Store) {
  const state = { down: false };
  const failOnce = new Map<string, Error>();
  const sent = new Map<string, number>();
  const store = new Proxy(real, {
    get(target, prop) {
      const v = Reflect.get(target, prop, target) as unknown;
      if (typeof v !== "function") return v;
      const name = String(prop);
      return async (...args: unknown[]) => {
        if (state.down) throw new StoreUnreachableError("store unreachable (injected)");
        const err = failOnce.get(name);
        if (err) {
          failOnce.delete(name);
          throw err;
        }
        sent.set(name, (sent.get(name) ?? 0) + 1);
        return (v as (...a: unknown[]) => unknown).apply(target, args);
      };
    },
  });
  return {
    store,
    sent,
    down: () => void (state.down = true),
    up: () => void (state.down = false),
    failNext: (method: keyof Store, err: Error) => void failOnce.set(method, err),
  };
}

/** Resolves once the guard reports the store reachable again (its probe runs on by itself). */
function reachableAgain(core: Core): Promise<void> {
  if (core.guard.reachable()) return Promise.resolve();
  return new Promise((resolve) => {
    const on = (up: boolean) => {
      if (!up) return;
      core.guard.events.off("change", on);
      resolve();
    };
    core.guard.events.on("change", on);
  });
}

async function codeOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (err) {
    return Code[ConnectError.from(err).code];
  }
  throw new Error("the call succeeded");
}

async function metricValue(m: Metrics, name: string): Promise<number> {
  const metric = m.registry.getSingleMetric(name);
  if (!metric) return NaN;
  return (await metric.get()).values[0]?.value ?? 0;
}

describeEachStore("credits admitted on trust while the store cannot be reached", (kind) => {
  let ts: TestStore | undefined;
  let outage!: ReturnType<typeof outageStore>;
  const cores: Core[] = [];

  async function instance(options: Partial<CoreOptions>): Promise<{ core: Core; clients: Clients; metrics: Metrics }> {
    ts ??= await openTestStore(kind);
    const rootKey = (await createRootKey(ts.store, "test", parseRootPermission("*")))!.plaintext;
    outage = outageStore(ts.store);
    const metrics = createMetrics();
    let t = 1_000_000;
    const core = createCore({ store: outage.store, logger, metrics, feedClock: () => (t += 1), options: { ...DEFAULT_CORE_OPTIONS, ...options } });
    cores.push(core);
    await core.start();
    core.feed.stop();
    const auth: Interceptor = (next) => (req) => {
      req.header.set("authorization", `Bearer ${rootKey}`);
      return next(req);
    };
    const transport = createRouterTransport(core.routes, { router: { interceptors: core.interceptors }, transport: { interceptors: [auth] } });
    return { core, metrics, clients: { identities: createClient(IdentityService, transport), keys: createClient(KeyService, transport) } };
  }

  async function storeGoes(core: Core): Promise<void> {
    outage.down();
    await core.guard.probe().catch(() => undefined);
    expect(core.guard.reachable()).toBe(false);
  }

  /** The store answers again; resolves once the reconciliation the instance starts on it has ended. */
  async function storeReturns(core: Core): Promise<boolean> {
    outage.up();
    await reachableAgain(core);
    return core.reconcileOutageCredits();
  }

  const remainingOf = async (id: string) => (await ts!.store.getKey(id))!.credits!.remaining;

  afterEach(async () => {
    outage?.up();
    for (const core of cores.splice(0)) await core.stop();
    await ts?.destroy();
    ts = undefined;
    lines.length = 0;
  });

  it("admits spends from a cached balance up to the allowance, then refuses with UNAVAILABLE; charges exactly the admitted total once the store is back", async () => {
    const { core, clients, metrics } = await instance({ outageCreditAllowance: 3 });
    const key = await createKey(clients, { credits: credits(100) });
    expect((await verify(clients, key.plaintext)).creditsRemaining).toBe(99n);

    await storeGoes(core);
    outage.sent.clear();
    const admitted = [await verify(clients, key.plaintext), await verify(clients, key.plaintext), await verify(clients, key.plaintext)];
    expect(admitted.map((r) => [r.codeName, r.creditsRemaining])).toEqual([
      ["VALID", 98n],
      ["VALID", 97n],
      ["VALID", 96n],
    ]);
    expect(await codeOf(verify(clients, key.plaintext))).toBe("Unavailable");
    // A cost the allowance has no room for is refused as well; nothing reached the store.
    expect(await codeOf(verify(clients, key.plaintext, { cost: 1n }))).toBe("Unavailable");
    expect(outage.sent.get("spendCredits")).toBeUndefined();
    expect(await metricValue(metrics, "latchkey_outage_credits_admitted_total")).toBe(3);
    expect(lines.filter((l) => l.includes("admitting credit spends")).length).toBe(1);
    // The cache still holds the balance as before the outage.
    expect(core.cache.cachedKey(hashKey(key.plaintext))).not.toBeUndefined();

    expect(await storeReturns(core)).toBe(true);
    // One spend of the admitted total (the store's own write path), applied once: 100 - 1 - 3.
    // (The answers above start from 99, what this instance's last spend left, not the cached 100.)
    expect(outage.sent.get("spendCredits")).toBe(1);
    expect(await remainingOf(key.id)).toBe(96);
    expect(core.outageCredits.pending()).toEqual({ balances: 0, credits: 0 });
    expect(await core.reconcileOutageCredits()).toBe(true);
    expect(await remainingOf(key.id)).toBe(96);
    expect(await metricValue(metrics, "latchkey_outage_credits_uncharged_total")).toBe(0);
    // The cached balance is read again.
    expect(core.cache.cachedKey(hashKey(key.plaintext))).toBeUndefined();
    expect((await verify(clients, key.plaintext)).creditsRemaining).toBe(95n);
    expect(lines.some((l) => l.includes("charged the credits admitted on trust"))).toBe(true);
  });

  it("never admits more than the cached balance could cover", async () => {
    const { core, clients } = await instance({ outageCreditAllowance: 10 });
    const key = await createKey(clients, { credits: credits(4) });
    expect((await verify(clients, key.plaintext)).creditsRemaining).toBe(3n);

    await storeGoes(core);
    expect(await codeOf(verify(clients, key.plaintext, { cost: 4n }))).toBe("Unavailable");
    expect((await verify(clients, key.plaintext, { cost: 2n })).creditsRemaining).toBe(1n);
    expect((await verify(clients, key.plaintext)).creditsRemaining).toBe(0n);
    expect(await codeOf(verify(clients, key.plaintext))).toBe("Unavailable");
    // A cost of 0 spends nothing and needs no room.
    expect((await verify(clients, key.plaintext, { cost: 0n })).codeName).toBe("VALID");

    expect(await storeReturns(core)).toBe(true);
    expect(await remainingOf(key.id)).toBe(0);
  });

  it("counts an identity's shared balance once for all its keys", async () => {
    const { core, clients } = await instance({ outageCreditAllowance: 2 });
    const { identityId, keys } = await createIdentityWithKeys(clients, 2, { externalId: unique("org"), credits: credits(50) });
    for (const k of keys) expect((await verify(clients, k)).codeName).toBe("VALID");

    await storeGoes(core);
    expect((await verify(clients, keys[0])).codeName).toBe("VALID");
    expect((await verify(clients, keys[1])).codeName).toBe("VALID");
    expect(await codeOf(verify(clients, keys[0]))).toBe("Unavailable");
    expect(await codeOf(verify(clients, keys[1]))).toBe("Unavailable");

    expect(await storeReturns(core)).toBe(true);
    expect((await ts!.store.getIdentity(identityId))!.credits!.remaining).toBe(46);
  });

  it("charges down to zero when the balance holds less than was admitted, and counts the rest as uncharged", async () => {
    const { core, clients, metrics } = await instance({ outageCreditAllowance: 5 });
    const key = await createKey(clients, { credits: credits(10) });
    expect((await verify(clients, key.plaintext)).codeName).toBe("VALID");

    await storeGoes(core);
    for (let i = 0; i < 5; i++) expect((await verify(clients, key.plaintext)).codeName).toBe("VALID");
    // Meanwhile another instance, which reaches the store, leaves 2 in the balance.
    await ts!.store.updateCredits({ keyId: key.id }, { op: "set", value: 2 }, Date.now(), null);

    expect(await storeReturns(core)).toBe(true);
    expect(await remainingOf(key.id)).toBe(0);
    expect(await metricValue(metrics, "latchkey_outage_credits_uncharged_total")).toBe(3);
    expect(core.outageCredits.pending()).toEqual({ balances: 0, credits: 0 });
  });

  it("retries a charge that failed until it lands, once", async () => {
    const { core, clients } = await instance({ outageCreditAllowance: 5 });
    const key = await createKey(clients, { credits: credits(10) });
    expect((await verify(clients, key.plaintext)).codeName).toBe("VALID");

    await storeGoes(core);
    for (let i = 0; i < 2; i++) expect((await verify(clients, key.plaintext)).codeName).toBe("VALID");
    outage.failNext("spendCredits", new Error("lock busy (injected)"));
    expect(await storeReturns(core)).toBe(false);
    expect(core.outageCredits.pending()).toEqual({ balances: 1, credits: 2 });
    expect(await remainingOf(key.id)).toBe(9);

    expect(await core.reconcileOutageCredits()).toBe(true);
    expect(await remainingOf(key.id)).toBe(7);
    expect(await core.reconcileOutageCredits()).toBe(true);
    expect(await remainingOf(key.id)).toBe(7);
  });

  it("charges what is left on a clean stop", async () => {
    const { core, clients } = await instance({ outageCreditAllowance: 5 });
    const key = await createKey(clients, { credits: credits(10) });
    expect((await verify(clients, key.plaintext)).codeName).toBe("VALID");

    await storeGoes(core);
    for (let i = 0; i < 3; i++) expect((await verify(clients, key.plaintext)).codeName).toBe("VALID");
    outage.failNext("spendCredits", new Error("lock busy (injected)"));
    expect(await storeReturns(core)).toBe(false);

    await core.stop();
    cores.splice(cores.indexOf(core), 1);
    expect(await remainingOf(key.id)).toBe(6);
  });

  it("refuses every spend during an outage with the default allowance of 0, as before", async () => {
    const { core, clients, metrics } = await instance({});
    const key = await createKey(clients, { credits: credits(100) });
    expect((await verify(clients, key.plaintext)).codeName).toBe("VALID");
    await storeGoes(core);
    expect(await codeOf(verify(clients, key.plaintext))).toBe("Unavailable");
    expect(await metricValue(metrics, "latchkey_outage_credits_admitted_total")).toBe(0);
    // Keys without credits still verify from the cache.
    const plain = await (async () => {
      outage.up();
      await reachableAgain(core);
      const k = await createKey(clients);
      expect((await verify(clients, k.plaintext)).codeName).toBe("VALID");
      await storeGoes(core);
      return k;
    })();
    expect((await verify(clients, plain.plaintext)).codeName).toBe("VALID");
    await storeReturns(core);
    expect(await remainingOf(key.id)).toBe(99);
  });
});

describe("the outage credits rule", () => {
  const balance = (remaining: number): Credits => ({ remaining, refill: null });

  it("stops tracking new balances past its cap, and refuses spends from them", () => {
    const rule = createOutageCredits({
      ledger: { spendCredits: () => Promise.reject(new Error("not called")) },
      allowance: 10,
      reachable: () => false,
      maxBalances: 2,
    });
    expect(rule.admit({ keyId: "key_a" }, balance(5), 1, 0, {})).not.toBeNull();
    expect(rule.admit({ identityId: "id_b" }, balance(5), 1, 0, {})).not.toBeNull();
    expect(rule.admit({ keyId: "key_c" }, balance(5), 1, 0, {})).toBeNull();
    // Balances already tracked go on to their allowance.
    expect(rule.admit({ keyId: "key_a" }, balance(5), 2, 0, {})?.remaining).toBe(2);
    expect(rule.pending()).toEqual({ balances: 2, credits: 4 });
  });

  it("admits nothing while the store is reachable", () => {
    const rule = createOutageCredits({ ledger: { spendCredits: () => Promise.reject(new Error("not called")) }, allowance: 10, reachable: () => true });
    expect(rule.admit({ keyId: "key_a" }, balance(5), 1, 0, {})).toBeNull();
  });

  it("applies a refill that is due to the cached balance, as the store would", () => {
    const rule = createOutageCredits({ ledger: { spendCredits: () => Promise.reject(new Error("not called")) }, allowance: 10, reachable: () => false });
    const day = 86_400_000;
    const exhausted: Credits = { remaining: 0, refill: { interval: "daily", amount: 3, refillDay: null, lastRefillAt: 0 } };
    expect(rule.admit({ keyId: "key_a" }, exhausted, 1, day / 2, {})).toBeNull();
    expect(rule.admit({ keyId: "key_a" }, exhausted, 1, day + 1, {})?.remaining).toBe(2);
  });
});
