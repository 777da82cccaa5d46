/**
 * What a cold lookup costs the MongoDB store: the commands it sends (the
 * driver's command events) and what the server reads for them (its explain),
 * counted, not timed. On FerretDB (bucketed key layout) a lookup by hash is one
 * `_id` find, pushed down to SQLite, in one bucket holding a few of the keys;
 * on MongoDB proper (indexed layout) one find that examines one document.
 * Root keys likewise: `_id` lookups only.
 */
import { afterAll, beforeAll, expect, it } from "vitest";
import type { CommandStartedEvent, Document } from "mongodb";
import { randomBytes } from "node:crypto";
import { hashKey } from "../../src/domain/key-format.js";
import { createRootKey } from "../../src/domain/root-keys.js";
import type { KeyRecord } from "../../src/domain/types.js";
import { companionDatabase, keyHashLocation } from "../../src/storage/mongodb/key-layout.js";
import { MongoStore } from "../../src/storage/mongodb/mongo-store.js";
import { dropDatabase, randomDatabaseName } from "../support/harness.js";
import { keyRecord } from "../support/records.js";
import { describeWith, mongodbUri } from "../verify/support.js";

const KEYS = 2000;

describeWith("MONGODB_URI", mongodbUri(), "what a cold lookup reads on MongoDB", () => {
  const database = randomDatabaseName();
  let writer: MongoStore;
  let probe: MongoStore;
  let keys: KeyRecord[];
  const sent: CommandStartedEvent[] = [];

  beforeAll(async () => {
    writer = new MongoStore({ uri: mongodbUri()!, database });
    await writer.init();
    keys = Array.from({ length: KEYS }, () => keyRecord().record);
    await writer.loadKeys(keys);
    // A second instance, cold: it has read no key yet.
    probe = new MongoStore({ uri: mongodbUri()!, database, monitorCommands: true });
    await probe.init();
    probe.client.on("commandStarted", (e) => sent.push(e));
  }, 120_000);
  afterAll(async () => {
    await probe?.close();
    await writer?.close();
    await dropDatabase(mongodbUri()!, database);
  });

  /** The commands `fn` sends, but the driver's own (hello, endSessions). */
  async function commandsOf(fn: () => Promise<unknown>): Promise<CommandStartedEvent[]> {
    sent.length = 0;
    await fn();
    return sent.filter((e) => !["hello", "isMaster", "ismaster", "endSessions", "ping"].includes(e.commandName));
  }

  /** The server's plan for a find command: FerretDB's pushdown and SQLite plan, or MongoDB's documents examined. */
  async function explain(e: CommandStartedEvent): Promise<Document> {
    const c = e.command;
    return probe.client.db(e.databaseName).command({ explain: { find: c.find, filter: c.filter, limit: c.limit ?? 1 }, verbosity: "executionStats" });
  }

  /** Documents a FerretDB `_id` find reads: SQLite scans the one table of its collection (checked in the plan). */
  async function examinedOnFerretDb(e: CommandStartedEvent): Promise<number> {
    const plan = await explain(e);
    expect(plan.filterPushdown, "the filter is pushed down to SQLite").toBe(true);
    const scans = JSON.stringify(plan.queryPlanner).match(/SCAN [^"]+/g) ?? [];
    expect(scans, "one table scanned").toHaveLength(1);
    return probe.client.db(e.databaseName).collection(e.command.find as string).countDocuments();
  }

  it(`finds a key by hash with one find, reading one bucket of a few of the ${KEYS} keys`, async () => {
    for (const k of keys.slice(0, 5)) {
      let found: unknown;
      const cmds = await commandsOf(async () => (found = await probe.getKeyByHash(k.hash)));
      expect(found).toEqual(k);
      expect(cmds.map((c) => c.commandName)).toEqual(["find"]);
      const [find] = cmds;
      if (probe.flavor === "ferretdb") {
        expect(probe.layout).toBe("bucketed");
        expect(find.databaseName).toBe(companionDatabase(database, keyHashLocation(k.hash).suffix));
        expect(find.command.find).toBe(keyHashLocation(k.hash).collection);
        expect(find.command.filter).toEqual({ _id: k.hash });
        const examined = await examinedOnFerretDb(find);
        // 2,000 keys over 4,096 buckets: none holds more than a few.
        expect(examined).toBeGreaterThanOrEqual(1);
        expect(examined).toBeLessThanOrEqual(10);
      } else {
        expect((await explain(find)).executionStats.totalDocsExamined).toBeLessThanOrEqual(1);
      }
    }
  });

  it("answers a hash it never had with one find in one bucket", async () => {
    // In the bucket of a key it has: a bucket that exists, and is read.
    const unknown = keys[7].hash.slice(0, 3) + hashKey(randomBytes(16).toString("hex")).slice(3);
    let found: unknown = "not asked";
    const cmds = await commandsOf(async () => (found = await probe.getKeyByHash(unknown)));
    expect(found).toBeNull();
    expect(cmds.map((c) => c.commandName)).toEqual(["find"]);
    if (probe.flavor === "ferretdb") {
      expect(cmds[0].command.find).toBe(keyHashLocation(keys[7].hash).collection);
      const examined = await examinedOnFerretDb(cmds[0]);
      expect(examined).toBeGreaterThanOrEqual(1);
      expect(examined).toBeLessThanOrEqual(10);
    }
    else expect((await explain(cmds[0])).executionStats.totalDocsExamined).toBe(0);
  });

  it("finds a root key by hash with `_id` lookups only", async () => {
    const made = (await createRootKey(writer, "probe", [{ action: "verify", apiId: null }]))!;
    const hash = made.record.hash;
    let found: { id: string } | null = null;
    const cmds = await commandsOf(async () => (found = await probe.getRootKeyByHash(hash)));
    expect(found!.id).toBe(made.record.id);
    for (const c of cmds) {
      expect(c.commandName).toBe("find");
      if (probe.flavor === "ferretdb") {
        expect(Object.keys(c.command.filter as object)).toEqual(["_id"]);
        const plan = await explain(c);
        expect(plan.filterPushdown).toBe(true);
      } else {
        expect((await explain(c)).executionStats.totalDocsExamined).toBeLessThanOrEqual(1);
      }
    }
  });
});
