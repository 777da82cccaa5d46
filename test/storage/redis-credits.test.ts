/**
 * The redis credits backend (src/storage/redis-credits.ts): balances spent in
 * Redis by one script, written back to MongoDB, shared by every instance. The
 * credit-writes contract, then what is particular to it: reads show the live
 * balance, write-back never goes back, any instance writes back what another
 * left (a killed one), a Redis that lost its data reloads what was written
 * back. Needs MONGODB_URI and REDIS_URL (skipped locally without, failing in CI).
 */
import { Redis } from "ioredis";
import { createRedisClient } from "../../src/app/redis.js";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import type { KeyRecord } from "../../src/domain/types.js";
import { MongoStore } from "../../src/storage/mongodb/mongo-store.js";
import { RedisCreditsStore, SPEND_NOW } from "../../src/storage/redis-credits.js";
import type { Store } from "../../src/storage/store.js";
import { dropDatabase, randomDatabaseName } from "../support/harness.js";
import { identityRecord, keyRecord } from "../support/records.js";
import { gatedStore, type GatedStore } from "../verify/store-gates.js";
import { describeWith, mongodbUri, redisUrl } from "../verify/support.js";
import { creditWritesContract } from "./credit-writes-contract.js";

const DAY = 86_400_000;
const today = Math.floor(Date.now() / DAY) * DAY;

/** One "instance": a MongoDB store with its own Redis client, write-back every `flushMs`. */
async function instance(database: string, flushMs = 60_000): Promise<RedisCreditsStore> {
  return (await gatedInstance(database, flushMs)).store;
}

/** The same, with gates in front of the MongoDB store's methods (the write-back's persistCredits among them). */
async function gatedInstance(database: string, flushMs = 60_000): Promise<{ store: RedisCreditsStore; gates: GatedStore }> {
  const client = createRedisClient(redisUrl()!); // the server's client, auto-pipelining on
  const gates = gatedStore(new MongoStore({ uri: mongodbUri()!, database }) as unknown as Store);
  const store = new RedisCreditsStore(gates.store as unknown as MongoStore, client, { flushMs, ownsClient: true });
  await store.init();
  return { store, gates };
}

describeWith("MONGODB_URI", mongodbUri(), "redis credits backend", () =>
  describeWith("REDIS_URL", redisUrl(), "on Redis", () => {
    describe("the credit-writes contract", () =>
      creditWritesContract(async () => {
        const database = randomDatabaseName();
        const store = await instance(database);
        return {
          store,
          close: async () => {
            await store.close();
            await dropDatabase(mongodbUri()!, database);
          },
        };
      }, { concurrent: true }));

    describe("write-back and instances", () => {
      let database: string;
      const open: RedisCreditsStore[] = [];
      const start = async (flushMs?: number) => {
        const s = await instance(database, flushMs);
        open.push(s);
        return s;
      };
      beforeEach(() => {
        database = randomDatabaseName();
      });
      afterEach(async () => {
        for (const s of open.splice(0)) await s.close().catch(() => undefined);
        await dropDatabase(mongodbUri()!, database);
      });
      const stored = async (s: RedisCreditsStore, id: string) => (await s.inner.getKey(id))!.credits;

      async function keyWith(s: RedisCreditsStore, remaining: number): Promise<KeyRecord> {
        const { record } = keyRecord({ credits: { remaining, refill: null } });
        await s.createKey(record);
        return record;
      }

      it("shows the live balance on reads before it is written back, and writes it back on flush", async () => {
        const a = await start();
        const k = await keyWith(a, 10);
        for (let i = 0; i < 3; i++) await a.spendCredits({ keyId: k.id }, 1, null);
        expect((await a.getKey(k.id))!.credits!.remaining).toBe(7);
        expect((await a.getKeyByHash(k.hash))!.credits!.remaining).toBe(7);
        expect((await a.listKeys({}, { limit: 10, afterId: null }))[0].credits!.remaining).toBe(7);
        expect((await stored(a, k.id))!.remaining, "MongoDB before the write-back").toBe(10);
        await a.flush();
        expect((await stored(a, k.id))!.remaining).toBe(7);
        expect(await a.pendingWriteBacks()).toBe(0);
      });

      it("admits exactly the balance from 60 concurrent spends on two instances", async () => {
        const a = await start();
        const b = await start();
        const i = identityRecord({ credits: { remaining: 25, refill: null } });
        await a.createIdentity(i);
        const res = await Promise.all(Array.from({ length: 60 }, (_, n) => (n % 2 ? a : b).spendCredits({ identityId: i.id }, 1, null)));
        expect(res.filter((r) => r.ok)).toHaveLength(25);
        await b.flush();
        expect((await a.inner.getIdentity(i.id))!.credits!.remaining).toBe(0);
      });

      it("refills once per period, whichever instance spends first", async () => {
        const a = await start();
        const b = await start();
        const i = identityRecord({ credits: { remaining: 0, refill: { interval: "daily", amount: 10, refillDay: null, lastRefillAt: today - DAY } } });
        await a.createIdentity(i);
        const due = { periodStart: today, amount: 10 };
        const res = await Promise.all(Array.from({ length: 30 }, (_, n) => (n % 2 ? a : b).spendCredits({ identityId: i.id }, 1, due)));
        expect(res.filter((r) => r.ok)).toHaveLength(10);
        await a.flush();
        expect((await a.inner.getIdentity(i.id))!.credits).toEqual({ remaining: 0, refill: { ...i.credits!.refill!, lastRefillAt: today } });
      });

      it("loses nothing when an instance is gone without writing back: another writes its spends back", async () => {
        const killed = await start();
        const k = await keyWith(killed, 10);
        for (let i = 0; i < 4; i++) await killed.spendCredits({ keyId: k.id }, 1, null);
        // Gone without a flush (its timer never fires: 60 s).
        open.splice(open.indexOf(killed), 1);
        await killed.inner.close();
        const other = await start();
        expect((await other.getKey(k.id))!.credits!.remaining).toBe(6);
        await other.flush();
        expect((await stored(other, k.id))!.remaining).toBe(6);
      });

      it("writes back at close what was spent while a write-back pass was held (a dead instance's lock): the stored balance is the last one", async () => {
        // The fault test's failure, by gates: B's timer pass reads the balance (9) and
        // waits in persistCredits — there, for the lock a killed instance held, until
        // its lease ran out. Meanwhile B's last spends take the balance to 6, and the
        // server, drained, closes the store. Before the fix close() joined the pass in
        // flight: it wrote 9, left the balance dirty (n had moved) and nobody was left
        // to write 6 — the stored balance admitted 3 credits that were answered VALID.
        const { store: b, gates } = await gatedInstance(database);
        open.push(b);
        const i = identityRecord({ credits: { remaining: 10, refill: null } });
        await b.createIdentity(i);
        expect(await b.spendCredits({ identityId: i.id }, 1, null)).toMatchObject({ ok: true, remaining: 9 });
        const held = gates.hold("persistCredits" as keyof Store);
        const pass = b.flush();
        const [, state, seq] = await held.reached;
        expect(state).toMatchObject({ remaining: 9 });
        for (let n = 0; n < 3; n++) expect(await b.spendCredits({ identityId: i.id }, 1, null)).toMatchObject({ ok: true });
        const closed = b.close();
        held.release();
        await pass;
        await closed;
        const reader = new MongoStore({ uri: mongodbUri()!, database });
        await reader.init();
        try {
          expect((await reader.getIdentity(i.id))!.credits!.remaining, `stored after close (the held pass wrote seq ${String(seq)})`).toBe(6);
          expect((await reader.readCreditsHolder({ identityId: i.id }))!.seq).toBe(4);
        } finally {
          await reader.close();
        }
      });

      it("a flush asked for while a pass is in flight writes what was spent before it was asked", async () => {
        const { store: a, gates } = await gatedInstance(database);
        open.push(a);
        const k = await keyWith(a, 10);
        await a.spendCredits({ keyId: k.id }, 1, null);
        const held = gates.hold("persistCredits" as keyof Store);
        const timerPass = a.flush();
        await held.reached;
        await a.spendCredits({ keyId: k.id }, 2, null);
        const asked = a.flush();
        held.release();
        await Promise.all([timerPass, asked]);
        expect((await stored(a, k.id))!.remaining).toBe(7);
        expect(await a.pendingWriteBacks()).toBe(0);
      });

      it("never writes an older balance over a newer one, whatever order write-backs run in", async () => {
        const a = await start();
        const b = await start();
        const k = await keyWith(a, 100);
        await a.spendCredits({ keyId: k.id }, 1, null);
        await a.flush();
        await a.spendCredits({ keyId: k.id }, 1, null);
        await Promise.all([a.flush(), b.flush(), a.spendCredits({ keyId: k.id }, 1, null)]);
        await b.flush();
        expect((await stored(a, k.id))!.remaining).toBe(97);
        // An old sequence number is refused.
        expect(await a.inner.persistCredits({ keyId: k.id }, { remaining: 99 }, 1)).toBe("stale");
        expect((await stored(a, k.id))!.remaining).toBe(97);
      });

      it("reloads what was written back when Redis lost a balance (the documented bound: one flush interval)", async () => {
        const a = await start();
        const k = await keyWith(a, 10);
        await a.spendCredits({ keyId: k.id }, 3, null);
        await a.flush();
        await a.spendCredits({ keyId: k.id }, 2, null); // not written back yet
        const redis = new Redis(redisUrl()!);
        await redis.del(`lk:${database}:cr:k:${k.id}`);
        await redis.quit();
        expect(await a.spendCredits({ keyId: k.id }, 1, null)).toMatchObject({ ok: true, remaining: 6 });
      });

      it("writes UpdateCredits through to MongoDB before answering, and a credits change by UpdateKey reaches Redis", async () => {
        const a = await start();
        const k = await keyWith(a, 10);
        await a.spendCredits({ keyId: k.id }, 4, null);
        expect(await a.updateCredits({ keyId: k.id }, { op: "increment", value: 5 }, Date.now(), null)).toEqual({ remaining: 11, refill: null });
        expect((await stored(a, k.id))!.remaining).toBe(11);
        await a.updateKey(k.id, { credits: { remaining: 2, refill: null } }, Date.now());
        expect(await a.spendCredits({ keyId: k.id }, 2, null)).toMatchObject({ ok: true, remaining: 0 });
        await a.updateKey(k.id, { credits: null }, Date.now());
        expect(await a.spendCredits({ keyId: k.id }, 2, null)).toEqual({ ok: true, remaining: null });
      });

      it("moves the live balance on a reroll: old and new key draw from it", async () => {
        const a = await start();
        const b = await start();
        const old = await keyWith(a, 10);
        await a.spendCredits({ keyId: old.id }, 3, null); // live in Redis, not written back
        const { record: next } = keyRecord({ apiId: old.apiId, credits: old.credits });
        const stored = await a.rerollKey(old.id, next, Date.now() + 60_000, Date.now());
        expect(stored!.credits!.remaining).toBe(7);
        expect(await b.spendCredits({ keyId: old.id }, 2, null)).toMatchObject({ ok: true, remaining: 5 });
        expect(await a.spendCredits({ keyId: next.id }, 5, null)).toMatchObject({ ok: true, remaining: 0 });
        expect(await b.spendCredits({ keyId: old.id }, 1, null)).toMatchObject({ ok: false, remaining: 0 });
        await a.flush();
        expect((await a.inner.getKey(next.id))!.credits!.remaining).toBe(0);
      });

      describe("spends of one balance while one is in flight go out together", () => {
        type Spend = (...args: unknown[]) => Promise<(string | number)[]>;
        /**
         * A gate in front of the instance's spend script: every call is recorded
         * with its costs; the first `hold` calls wait until the test releases
         * them, and `fail` makes the next call fail.
         */
        function gateScript(s: RedisCreditsStore, hold: number) {
          const holder = s as unknown as { redis: { lkCreditsSpend: Spend } };
          const redis = holder.redis;
          const calls: number[][] = [];
          const held: (() => void)[] = [];
          const gate = { calls, release: () => held.splice(0).forEach((go) => go()), fail: false };
          const gated = async (...args: unknown[]) => {
            calls.push(String(args[6]).split(",").map(Number));
            if (calls.length <= hold) await new Promise<void>((go) => held.push(go));
            if (gate.fail) {
              gate.fail = false;
              throw new Error("injected: connection reset");
            }
            return redis.lkCreditsSpend(...args);
          };
          // In front of the client, not patched into it (its auto-pipelining calls its own methods).
          // Both names of the script: the one a lone batch goes by, and the auto-pipelined one.
          holder.redis = new Proxy(redis, {
            get: (target, name) => {
              if (name === "lkCreditsSpend" || name === SPEND_NOW) return gated;
              const v = Reflect.get(target, name, target) as unknown;
              return typeof v === "function" ? v.bind(target) : v;
            },
          });
          return gate;
        }
        const settled = () => new Promise((r) => setImmediate(r));

        it("admits exactly the balance in order, in one script for all that queued behind the first", async () => {
          const a = await start();
          const k = await keyWith(a, 5);
          await a.spendCredits({ keyId: k.id }, 0, null); // loaded in Redis
          const gate = gateScript(a, 1);
          const spends = [a.spendCredits({ keyId: k.id }, 1, null)];
          await settled();
          spends.push(...Array.from({ length: 7 }, () => a.spendCredits({ keyId: k.id }, 1, null)));
          await settled();
          expect(gate.calls).toEqual([[1]]); // the others wait for it
          gate.release();
          const res = await Promise.all(spends);
          expect(gate.calls).toEqual([[1], [1, 1, 1, 1, 1, 1, 1]]);
          expect(res.map((r) => [r.ok, r.remaining])).toEqual([
            [true, 4],
            [true, 3],
            [true, 2],
            [true, 1],
            [true, 0],
            [false, 0],
            [false, 0],
            [false, 0],
          ]);
          expect((await a.getKey(k.id))!.credits!.remaining).toBe(0);
        });

        it("spends nothing for a queued call that ended before its batch went out, and the rest of the batch spends", async () => {
          const a = await start();
          const k = await keyWith(a, 10);
          await a.spendCredits({ keyId: k.id }, 0, null); // loaded in Redis
          const gate = gateScript(a, 1);
          const ended = new AbortController();
          const first = a.spendCredits({ keyId: k.id }, 1, null);
          await settled();
          const gone = a.spendCredits({ keyId: k.id }, 4, null, ended.signal);
          const kept = a.spendCredits({ keyId: k.id }, 2, null);
          await settled();
          ended.abort(new Error("the client went away"));
          gate.release();
          await expect(gone).rejects.toThrow("the client went away");
          expect(await first).toMatchObject({ ok: true, remaining: 9 });
          expect(await kept).toMatchObject({ ok: true, remaining: 7 });
          expect(gate.calls).toEqual([[1], [2]]);
          expect((await a.getKey(k.id))!.credits!.remaining).toBe(7);
        });

        it("fails only the batch whose script failed; what queued behind it still spends", async () => {
          const a = await start();
          const k = await keyWith(a, 10);
          await a.spendCredits({ keyId: k.id }, 1, null); // loaded in Redis
          const gate = gateScript(a, 1);
          gate.fail = true;
          const failed = a.spendCredits({ keyId: k.id }, 3, null);
          await settled();
          const queued = a.spendCredits({ keyId: k.id }, 2, null);
          await settled();
          gate.release();
          await expect(failed).rejects.toThrow(/credits \(redis\): injected/);
          expect(await queued).toMatchObject({ ok: true, remaining: 7 });
          expect((await a.getKey(k.id))!.credits!.remaining).toBe(7);
        });

        it("sends the spends of one balance made in one turn of the event loop as one script", async () => {
          const a = await start();
          const k = await keyWith(a, 10);
          await a.spendCredits({ keyId: k.id }, 0, null); // loaded in Redis
          const gate = gateScript(a, 0);
          const res = await Promise.all([3, 1, 4, 1, 5].map((cost) => a.spendCredits({ keyId: k.id }, cost, null)));
          expect(gate.calls).toEqual([[3, 1, 4, 1, 5]]);
          expect(res.map((r) => [r.ok, r.remaining])).toEqual([
            [true, 7],
            [true, 6],
            [true, 2],
            [true, 1],
            [false, 1],
          ]);
        });

        it("counts a batch's remainders from the refilled balance when the batch applies a due refill", async () => {
          const a = await start();
          const i = identityRecord({ credits: { remaining: 1, refill: { interval: "daily", amount: 5, refillDay: null, lastRefillAt: today - DAY } } });
          await a.createIdentity(i);
          await a.spendCredits({ identityId: i.id }, 0, null); // loaded in Redis, not refilled
          const gate = gateScript(a, 0);
          const due = { periodStart: today, amount: 5 };
          const res = await Promise.all([2, 2, 2, 1].map((cost) => a.spendCredits({ identityId: i.id }, cost, due)));
          expect(gate.calls).toEqual([[2, 2, 2, 1]]);
          expect(res.map((r) => [r.ok, r.remaining, "refilledAt" in r ? r.refilledAt : undefined])).toEqual([
            [true, 3, today],
            [true, 1, today],
            [false, 1, today],
            [true, 0, today],
          ]);
          await a.flush();
          expect((await a.inner.getIdentity(i.id))!.credits).toEqual({ remaining: 0, refill: { ...i.credits!.refill!, lastRefillAt: today } });
        });

        it("sends at most 500 spends in one script; the rest go out in the next", async () => {
          const a = await start();
          const k = await keyWith(a, 1000);
          await a.spendCredits({ keyId: k.id }, 0, null); // loaded in Redis
          const gate = gateScript(a, 0);
          const res = await Promise.all(Array.from({ length: 1200 }, () => a.spendCredits({ keyId: k.id }, 1, null)));
          expect(gate.calls.map((c) => c.length)).toEqual([500, 500, 200]);
          expect(res.filter((r) => r.ok)).toHaveLength(1000);
          expect(res.slice(0, 1000).map((r) => r.remaining)).toEqual(Array.from({ length: 1000 }, (_, i) => 999 - i));
          expect((await a.getKey(k.id))!.credits!.remaining).toBe(0);
        });

        it("writes the batches of several balances made in one turn to Redis at once, and a lone balance's batch in one write", async () => {
          const a = await start();
          const ks = [await keyWith(a, 10), await keyWith(a, 10), await keyWith(a, 10)];
          for (const k of ks) await a.spendCredits({ keyId: k.id }, 0, null); // loaded in Redis
          // Every write to the client's socket, counted.
          const stream = (a as unknown as { redis: { stream: { write: (...args: unknown[]) => boolean } } }).redis.stream;
          const write = stream.write;
          let writes = 0;
          stream.write = function (this: unknown, ...args: unknown[]) {
            writes++;
            return write.apply(this, args);
          };
          try {
            const res = await Promise.all(ks.flatMap((k) => [a.spendCredits({ keyId: k.id }, 1, null), a.spendCredits({ keyId: k.id }, 2, null)]));
            expect(res.map((r) => [r.ok, r.remaining])).toEqual(ks.flatMap(() => [[true, 9], [true, 7]]));
            expect(writes).toBe(1);
            writes = 0;
            const lone = await Promise.all([a.spendCredits({ keyId: ks[0]!.id }, 3, null), a.spendCredits({ keyId: ks[0]!.id }, 4, null)]);
            expect(lone.map((r) => r.remaining)).toEqual([4, 0]);
            expect(writes).toBe(1);
          } finally {
            stream.write = write;
          }
        });

        it("keeps balances apart: spends of another key do not wait for this one's", async () => {
          const a = await start();
          const k1 = await keyWith(a, 10);
          const k2 = await keyWith(a, 10);
          await a.spendCredits({ keyId: k2.id }, 1, null);
          const gate = gateScript(a, 1);
          const held = a.spendCredits({ keyId: k1.id }, 1, null);
          expect(await a.spendCredits({ keyId: k2.id }, 1, null)).toMatchObject({ ok: true, remaining: 8 });
          gate.release();
          expect(await held).toMatchObject({ ok: true, remaining: 9 });
        });
      });
    });
  }),
);
