/**
 * Store.spendCredits and Store.updateCredits on every way a store writes
 * credits: SQLite transactions, MongoDB under the lease lock (what FerretDB
 * runs), and MongoDB's conditional updates (what MongoDB runs; also run here on
 * FerretDB, with one writer, since FerretDB applies an update as a read and a
 * write and cannot show its atomicity). The concurrent cases run where the
 * server can hold them. The Redis credits backend: redis-credits.test.ts.
 */
import { describe, expect, it } from "vitest";
import type { Credits, CreditsOp } from "../../src/domain/types.js";
import { MongoStore } from "../../src/storage/mongodb/mongo-store.js";
import { dropDatabase, openTestStore, randomDatabaseName } from "../support/harness.js";
import { describeWith, isFerretDb, mongodbUri } from "../verify/support.js";
import { identityRecord } from "../support/records.js";
import { creditWritesContract } from "./credit-writes-contract.js";

describe("credit writes on the embedded store", () => {
  creditWritesContract(async () => {
    const ts = await openTestStore("embedded");
    return { store: ts.store, close: () => ts.destroy() };
  }, { concurrent: true });
});

describeWith("MONGODB_URI", mongodbUri(), "credit writes on MongoDB", () => {
  const mongo = (creditWrites: "locked" | "conditional") => async () => {
    const database = randomDatabaseName();
    const store = new MongoStore({ uri: mongodbUri()!, database, creditWrites });
    await store.init();
    return {
      store,
      close: async () => {
        await store.close();
        await dropDatabase(mongodbUri()!, database);
      },
    };
  };
  describe("under the lease lock (FerretDB's way)", () => creditWritesContract(mongo("locked"), { concurrent: true }));
  // MongoDB's way relies on its atomic single-document updates; FerretDB can show it with one writer.
  describe(`with conditional updates (MongoDB's way${isFerretDb() ? "; one writer on FerretDB" : ""})`, () =>
    creditWritesContract(mongo("conditional"), { concurrent: !isFerretDb() }));

  /*
   * A hot balance on MongoDB without the Redis credits backend: spends land all
   * the time, each a conditional write. An update (UpdateCredits) must not
   * depend on nothing having been spent between its read and its write, or a
   * customer spending constantly can never be topped up (it used to
   * compare-and-set on the write counter every spend moves, and gave up after
   * MAX_CAS_TRIES: UNAVAILABLE "the balance kept changing"). Here a spend is
   * made after every read of the balance's document while the update runs —
   * sequentially, so FerretDB (one writer at a time) can show it.
   */
  describe("with conditional updates, a balance spent from between an update's read and its write", () => {
    const DAY = 86_400_000;
    const today = Math.floor(Date.now() / DAY) * DAY;
    async function underSpends(
      credits: Credits,
      ops: { op: CreditsOp; refill?: { periodStart: number; amount: number } }[],
      spendRefill: { periodStart: number; amount: number } | null = null,
    ) {
      const { store, close } = await mongo("conditional")();
      try {
        const identity = identityRecord({ credits });
        await store.createIdentity(identity);
        const target = { identityId: identity.id };
        const coll = store.identities as unknown as { findOne: (...a: unknown[]) => Promise<unknown> };
        const findOne = coll.findOne.bind(coll);
        let updating = false;
        let spending = false;
        let spent = 0;
        coll.findOne = async (...a: unknown[]) => {
          const doc = await findOne(...a);
          if (updating && !spending) {
            spending = true;
            try {
              if ((await store.spendCredits(target, 1, spendRefill)).ok) spent++;
            } finally {
              spending = false;
            }
          }
          return doc;
        };
        const results: (Credits | null | undefined)[] = [];
        for (const { op, refill } of ops) {
          updating = true;
          try {
            results.push(await store.updateCredits(target, op, Date.now(), refill ?? null));
          } finally {
            updating = false;
          }
        }
        return { results, spent, after: (await store.getIdentity(identity.id))!.credits };
      } finally {
        await close();
      }
    }

    it("applies an increment and a decrement, counting every spend made meanwhile", async () => {
      const { results, spent, after } = await underSpends({ remaining: 1_000, refill: null }, [
        { op: { op: "increment", value: 500 } },
        { op: { op: "decrement", value: 200 } },
      ]);
      expect(spent).toBeGreaterThan(0);
      expect(after).toEqual({ remaining: 1_000 + 500 - 200 - spent, refill: null });
      expect(results.at(-1)!.remaining).toBeGreaterThanOrEqual(after!.remaining);
    });

    it("stops a decrement at zero when spends took the balance below it meanwhile", async () => {
      const { results, after } = await underSpends({ remaining: 100, refill: null }, [{ op: { op: "decrement", value: 100 } }]);
      expect(results[0]).toEqual({ remaining: 0, refill: null });
      expect(after).toEqual({ remaining: 0, refill: null });
    });

    it("applies a set and a due refill once", async () => {
      const daily = (remaining: number, lastRefillAt: number): Credits => ({ remaining, refill: { interval: "daily", amount: 10, refillDay: null, lastRefillAt } });
      const { results, after, spent } = await underSpends(daily(1_000, today - DAY), [
        { op: { op: "increment", value: 5 }, refill: { periodStart: today, amount: 10 } },
        { op: { op: "set", value: 50 } },
      ]);
      expect(spent).toBeGreaterThan(0);
      // The refill resets the balance (the spend of yesterday's period before it counts no more), then adds 5.
      expect(results[0]).toEqual(daily(15, today));
      expect(results[1]).toEqual(daily(50, today));
      // A set wins over spends before it; any after it count.
      expect(after!.refill).toEqual(daily(0, today).refill);
      expect(after!.remaining).toBeLessThanOrEqual(50);
      expect(after!.remaining).toBeGreaterThanOrEqual(50 - spent);
    });

    it("counts a spend that applied the day's refill between an increment's read and its write", async () => {
      const daily = (remaining: number, lastRefillAt: number): Credits => ({ remaining, refill: { interval: "daily", amount: 10, refillDay: null, lastRefillAt } });
      const due = { periodStart: today, amount: 10 };
      // The update read yesterday's balance; the spend after that read refills (10) and takes 1; the update must add its 5 to that.
      const { results, after, spent } = await underSpends(daily(1_000, today - DAY), [{ op: { op: "increment", value: 5 }, refill: due }], due);
      expect(results[0]).toEqual(daily(10 + 5 - spent, today));
      expect(after).toEqual(daily(10 + 5 - spent, today));
    });
  });
});
