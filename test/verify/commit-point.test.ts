/**
 * The commit point (README "Deadlines and the commit point"): a verification
 * whose signal aborted — deadline passed, client cancelled — before its credit
 * spend was written spends nothing: no credits, and its window tokens go back to
 * the windows they were taken from. After the commit point it stands.
 *
 * In process, with gates on the store and the counter (test/verify/gates.ts),
 * on both stores; at the wire, a real server on FerretDB behind a TCP proxy
 * that holds the spend's first store command until the client's deadline has
 * passed (Connect over HTTP/1.1 with a `connect-timeout-ms`).
 */
import { afterEach, beforeEach, expect, it } from "vitest";
import { createVerificationCache } from "../../src/cache/verification-cache.js";
import { Principal } from "../../src/domain/access.js";
import { CanceledError, DeadlineExceededError } from "../../src/domain/errors.js";
import type { KeyRecord } from "../../src/domain/types.js";
import { createVerifier, type VerifyInput } from "../../src/domain/verify.js";
import { createMemoryCounter, type RateLimitCounter } from "../../src/ratelimit/counter.js";
import { MongoStore } from "../../src/storage/mongodb/mongo-store.js";
import type { Store } from "../../src/storage/store.js";
import { dropMongoDatabase, runCli, startServer, uniqueName, type ServerProcess } from "../integration/support.js";
import { openTestStore, randomDatabaseName, type StoreKind, type TestStore } from "../support/harness.js";
import { callState } from "../support/call-state.js";
import { keyRecord } from "../support/records.js";
import { isMongoCommand, startTcpProxy, type TcpProxy } from "../support/tcp-proxy.js";
import { gated, observed } from "./gates.js";
import { describeEachStore, describeWith, isFerretDb, mongodbUri } from "./support.js";

const VERIFY_ALL = new Principal("root_test", [{ action: "verify", apiId: null }]);
const input = (key: string, over: Partial<VerifyInput> = {}): VerifyInput => ({
  key,
  apiId: "",
  permissions: "",
  ratelimits: [],
  cost: null,
  tags: [],
  ...over,
});
const MINUTE = 60_000;
/** A memory counter on a clock that stands still: no test here straddles a window boundary. */
const T0 = Date.now();
const frozenCounter = () => createMemoryCounter({ now: () => T0 });

/** A key with 5 credits and a 10-per-minute limit of its own. */
async function keyWithCreditsAndLimit(store: Store): Promise<{ record: KeyRecord; plaintext: string }> {
  const k = keyRecord({ credits: { remaining: 5, refill: null }, ratelimits: [{ name: "rpm", limit: 10, durationMs: MINUTE, autoApply: true }] });
  await store.createKey(k.record);
  return k;
}

function verifierOver(store: Store, counter: RateLimitCounter) {
  const cache = createVerificationCache({ store, options: { maxEntries: 100, ttlMs: 60_000 } });
  return createVerifier({ store, cache, counter });
}

/** What the key's window holds now. */
const windowTotal = async (counter: RateLimitCounter, k: KeyRecord) => (await counter.take(`k:${k.id}:rpm:${MINUTE}`, 0, 10, MINUTE)).total;

describeEachStore("the commit point of a verification", (kind: StoreKind) => {
  let ts: TestStore;
  beforeEach(async () => {
    ts = await openTestStore(kind);
  });
  afterEach(async () => {
    await ts.destroy();
  });

  it("spends nothing when the signal aborts while the credit spend waits: no credits, tokens back in their window", async () => {
    const k = await keyWithCreditsAndLimit(ts.store);
    const counter = frozenCounter();
    const { wrapped, gate } = gated(ts.store, "spendCredits");
    const verify = verifierOver(wrapped, counter);
    const call = new AbortController();
    const answer = verify(VERIFY_ALL, input(k.plaintext), { signal: call.signal });
    await gate.arrived;
    call.abort(new DOMException("the deadline passed", "TimeoutError"));
    gate.release();
    await expect(answer).rejects.toBeInstanceOf(DeadlineExceededError);
    expect((await ts.store.getKey(k.record.id))!.credits!.remaining).toBe(5);
    expect(await windowTotal(counter, k.record)).toBe(0);
    // The next verification finds everything as it was.
    const next = await verify(VERIFY_ALL, input(k.plaintext));
    expect([next.code, next.creditsRemaining, next.ratelimits[0].remaining]).toEqual(["VALID", 4, 9]);
  });

  it("spends nothing when the signal aborts while the limits are being taken", async () => {
    const k = await keyWithCreditsAndLimit(ts.store);
    const { wrapped: counter, gate } = gated(frozenCounter() as RateLimitCounter, "take");
    const spends: unknown[] = [];
    const verify = verifierOver(
      observed(ts.store, "spendCredits", (r) => spends.push(r)),
      counter,
    );
    const call = new AbortController();
    const answer = verify(VERIFY_ALL, input(k.plaintext), { signal: call.signal });
    await gate.arrived;
    call.abort(); // the client went away
    gate.release();
    await expect(answer).rejects.toBeInstanceOf(CanceledError);
    expect(spends).toEqual([]);
    expect((await ts.store.getKey(k.record.id))!.credits!.remaining).toBe(5);
    expect(await windowTotal(counter, k.record)).toBe(0);
  });

  it("gives back a spend that completed after the call ended (a slow write), with the window tokens", async () => {
    const k = await keyWithCreditsAndLimit(ts.store);
    const counter = frozenCounter();
    const call = new AbortController();
    const verify = verifierOver(
      observed(ts.store, "spendCredits", () => call.abort()),
      counter,
    );
    await expect(verify(VERIFY_ALL, input(k.plaintext), { signal: call.signal })).rejects.toBeInstanceOf(CanceledError);
    expect((await ts.store.getKey(k.record.id))!.credits!.remaining).toBe(5);
    expect(await windowTotal(counter, k.record)).toBe(0);
  });

  it("lets a late spend stand when it cannot be given back: a refill set the balance in between", async () => {
    const DAY = 86_400_000;
    const today = Math.floor(Date.now() / DAY) * DAY;
    const k = keyRecord({ credits: { remaining: 5, refill: { interval: "daily", amount: 10, refillDay: null, lastRefillAt: today } } });
    await ts.store.createKey(k.record);
    const call = new AbortController();
    const store = ts.store;
    const spendThenRefill: Store = Object.assign(Object.create(store) as Store, {
      async spendCredits(...args: Parameters<Store["spendCredits"]>) {
        const res = await store.spendCredits(...args);
        call.abort();
        // Another instance refills the balance for the next day meanwhile.
        await store.spendCredits({ keyId: k.record.id }, 0, { periodStart: today + DAY, amount: 10 });
        return res;
      },
    });
    const verify = verifierOver(spendThenRefill, frozenCounter());
    const v = await verify(VERIFY_ALL, input(k.plaintext), { signal: call.signal });
    expect([v.code, v.creditsRemaining]).toEqual(["VALID", 4]);
    expect((await ts.store.getKey(k.record.id))!.credits!.remaining).toBe(10);
  });

  it("does not commit with no more than the commit margin of the call's deadline left, and commits with more", async () => {
    const k = await keyWithCreditsAndLimit(ts.store);
    const counter = frozenCounter();
    const mono = { t: 1000 };
    const { wrapped, gate } = gated(counter as RateLimitCounter, "take");
    const cache = createVerificationCache({ store: ts.store, options: { maxEntries: 100, ttlMs: 60_000 } });
    const verify = createVerifier({ store: ts.store, cache, counter: wrapped, commitMarginMs: 1, monotonic: () => mono.t });
    // 5 ms of deadline; 4.5 ms pass while the limits are taken: 0.5 ms left at the commit point.
    const late = verify(VERIFY_ALL, input(k.plaintext), { timeoutMs: 5 });
    await gate.arrived;
    mono.t += 4.5;
    gate.release();
    await expect(late).rejects.toBeInstanceOf(DeadlineExceededError);
    expect((await ts.store.getKey(k.record.id))!.credits!.remaining).toBe(5);
    expect(await windowTotal(counter, k.record)).toBe(0);
    const inTime = await verify(VERIFY_ALL, input(k.plaintext), { timeoutMs: 5 });
    expect([inTime.code, inTime.creditsRemaining]).toEqual(["VALID", 4]);
  });

  it("does not start when the signal has already aborted", async () => {
    const k = await keyWithCreditsAndLimit(ts.store);
    const counter = frozenCounter();
    const verify = verifierOver(ts.store, counter);
    await expect(verify(VERIFY_ALL, input(k.plaintext), { signal: AbortSignal.abort() })).rejects.toBeInstanceOf(CanceledError);
    expect((await ts.store.getKey(k.record.id))!.credits!.remaining).toBe(5);
    expect(await windowTotal(counter, k.record)).toBe(0);
  });
});

describeWith("MONGODB_URI", mongodbUri(), "the commit point while a spend waits for the MongoDB lock", () => {
  let store: MongoStore;
  let database: string;
  beforeEach(async () => {
    database = randomDatabaseName();
    store = new MongoStore({ uri: mongodbUri()!, database, creditWrites: "locked" });
    await store.init();
  });
  afterEach(async () => {
    await store.client.db(database).dropDatabase();
    await store.close();
  });

  /** A key with 5 credits whose balance lock another, live process holds while `fn` runs; then the lock is let go. */
  async function whileLockHeldElsewhere(fn: (keyId: string) => Promise<void>): Promise<string> {
    const k = keyRecord({ credits: { remaining: 5, refill: null } });
    await store.createKey(k.record);
    // Another process holds the balance's lock, and shows it is alive.
    const locks = store.client.db(database).collection<{ _id: string; token: string; beat: number }>("locks");
    await locks.insertOne({ _id: `key:${k.record.id}`, token: "other-process", beat: 0 });
    const beating = setInterval(() => void locks.updateOne({ _id: `key:${k.record.id}` }, { $inc: { beat: 1 } }), 100);
    try {
      await fn(k.record.id);
    } finally {
      clearInterval(beating);
      await locks.deleteOne({ _id: `key:${k.record.id}` });
    }
    return k.record.id;
  }

  it("leaves the lock queue at once when its signal aborts, and the spend is never written", async () => {
    const keyId = await whileLockHeldElsewhere(async (id) => {
      const call = new AbortController();
      const spend = store.spendCredits({ keyId: id }, 1, null, call.signal);
      call.abort(new Error("deadline passed"));
      await expect(spend).rejects.toThrow("deadline passed");
    });
    expect(await store.spendCredits({ keyId }, 1, null)).toMatchObject({ ok: true, remaining: 4 });
  });

  it("leaves the lock queue at once when the lean path's call state (not an AbortSignal) ends, and the spend is never written", async () => {
    const keyId = await whileLockHeldElsewhere(async (id) => {
      const call = callState();
      const spend = store.spendCredits({ keyId: id }, 1, null, call.signal);
      expect(call.madeSignals()).toBe(1); // the queued spend asked for an AbortSignal to hear the end by
      call.end(new Error("deadline passed"));
      await expect(spend).rejects.toThrow("deadline passed");
    });
    expect(await store.spendCredits({ keyId }, 1, null)).toMatchObject({ ok: true, remaining: 4 });
  });
});

/* ---------------------------------------------------------------------------
 * At the wire: a real server process on FerretDB, reached through a proxy that
 * holds the spend's first store command (the lock insert) until the client has
 * seen its deadline pass.
 */

describeWith("MONGODB_URI", isFerretDb() ? mongodbUri() : null, "the commit point at the wire (FerretDB)", () => {
  let proxy: TcpProxy;
  let server: ServerProcess;
  let database: string;
  let rootKey: string;

  beforeEach(async () => {
    const target = new URL(mongodbUri()!);
    proxy = await startTcpProxy({ host: target.hostname, port: Number(target.port || 27017) });
    database = uniqueName("lk_commit");
    const env = {
      MONGODB_URI: `mongodb://${proxy.address}/?directConnection=true`,
      LATCHKEY_MONGODB_DATABASE: database,
      LATCHKEY_RATELIMIT_BACKEND: "memory",
    };
    const created = await runCli(["root-keys", "create", "--name", "t", "--permission", "*"], env);
    expect(created.code, created.stderr).toBe(0);
    rootKey = (JSON.parse(created.stdout.trim().split("\n").pop()!) as { key: string }).key;
    server = await startServer({ env });
  });
  afterEach(async () => {
    await server?.kill("SIGKILL");
    await proxy?.close();
    await dropMongoDatabase(database).catch(() => undefined);
  });

  const connect = (method: string, body: unknown, headers: Record<string, string> = {}) =>
    fetch(`${server.baseUrl}/latchkey.v1.KeyService/${method}`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${rootKey}`, ...headers },
      body: JSON.stringify(body),
    }).then(async (r) => ({ status: r.status, body: (await r.json()) as Record<string, any> }));

  it("charges nothing for a VerifyKey with a deadline too short for its answer to arrive (1 ms, the commit margin)", async () => {
    const created = await connect("CreateKey", { apiId: "api_commit", credits: { remaining: "5" } });
    const key = created.body.plaintext as string;
    expect((await connect("VerifyKey", { key })).body.creditsRemaining).toBe("4");
    for (let i = 0; i < 10; i++) expect((await connect("VerifyKey", { key }, { "connect-timeout-ms": "1" })).body.code).toBe("deadline_exceeded");
    expect((await connect("GetKey", { id: created.body.key.id })).body.key.credits.remaining).toBe("4");
  }, 60_000);

  it("charges nothing for a VerifyKey whose deadline passed before its spend was written", async () => {
    const created = await connect("CreateKey", { apiId: "api_commit", credits: { remaining: "5" } });
    expect(created.status).toBe(200);
    const key = created.body.plaintext as string;
    const id = created.body.key.id as string;
    // Cached, so that the held call's first store command is its spend.
    expect((await connect("VerifyKey", { key })).body.creditsRemaining).toBe("4");

    const spendSeen = proxy.holdWhen((chunk) => isMongoCommand(chunk, "insert", "locks"));
    const late = connect("VerifyKey", { key }, { "connect-timeout-ms": "300" });
    await spendSeen;
    const answer = await late;
    expect(answer.body.code).toBe("deadline_exceeded");
    proxy.release();

    // Anything still in flight for the late call is ordered before this one.
    expect((await connect("VerifyKey", { key })).body.creditsRemaining).toBe("3");
    expect((await connect("GetKey", { id })).body.key.credits.remaining).toBe("3");
  }, 60_000);
});
