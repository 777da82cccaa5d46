/**
 * Store.spendCredits and Store.updateCredits on every way a store writes
 * credits: SQLite transactions, MongoDB under the lease lock (what FerretDB
 * runs), and MongoDB's conditional updates (what MongoDB runs; also run here on
 * FerretDB, with one writer, since FerretDB applies an update as a read and a
 * write and cannot show its atomicity). The concurrent cases run where the
 * server can hold them. The Redis credits backend: redis-credits.test.ts.
 */
import { describe } from "vitest";
import { MongoStore } from "../../src/storage/mongodb/mongo-store.js";
import { dropDatabase, openTestStore, randomDatabaseName } from "../support/harness.js";
import { describeWith, isFerretDb, mongodbUri } from "../verify/support.js";
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
});
