/**
 * The change feed and record versions, one contract for every store
 * (docs/revocation.md): every write that records a change raises the record's
 * version and a credit spend does not; seqs have no gap; an operation on many
 * keys (DeleteIdentity) records them in batches, not one entry per key;
 * pruning keeps the newest entry; a reader can read past a missing entry.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { MongoStore } from "../../src/storage/mongodb/mongo-store.js";
import type { Change, Store } from "../../src/storage/store.js";
import { mongoUri, openTestStore, type StoreKind, type TestStore } from "../support/harness.js";
import { identityRecord, keyRecord } from "../support/records.js";
import { deleteChange } from "../verify/store-gates.js";

const KINDS: StoreKind[] = ["embedded", "mongodb"];

describe.each(KINDS)("%s store: change feed and versions", (kind) => {
  if (kind === "mongodb" && !mongoUri()) {
    if (process.env.CI) it("runs in CI", () => expect.fail("MONGODB_URI is not set, but CI is"));
    else it.skip("needs MONGODB_URI", () => undefined);
    return;
  }

  let ts: TestStore;
  const store = (): Store => ts.store;
  beforeAll(async () => {
    ts = await openTestStore(kind);
  });
  afterAll(async () => {
    await ts?.destroy();
  });

  /** The entries written by `fn`. */
  async function recorded(fn: () => Promise<unknown>): Promise<Change[]> {
    const before = await store().lastChangeSeq();
    await fn();
    return store().changesSince(before, 10_000);
  }

  /** Each target with the phases it was recorded in: one write, or an intent before and a done after. */
  function phasesOf(changes: Change[]): Map<string, string[]> {
    const out = new Map<string, string[]>();
    for (const c of changes) {
      for (const id of [...c.keys.map((k) => k.id), ...c.identities]) out.set(id, [...(out.get(id) ?? []), c.phase]);
    }
    return out;
  }
  const once = kind === "embedded" ? ["write"] : ["intent", "done"];

  it("raises a key's version by one with each write that records a change, and not with a credit spend", async () => {
    const { record: k } = keyRecord({ credits: { remaining: 10, refill: null } });
    await store().createKey(k);
    const version = async () => (await store().getKey(k.id))!.version ?? 0;
    expect(await version()).toBe(0);
    await store().updateKey(k.id, { name: "a" }, Date.now());
    expect(await version()).toBe(1);
    await store().spendCredits({ keyId: k.id }, 1, null);
    expect(await version(), "a spend keeps the version").toBe(1);
    await store().updateCredits({ keyId: k.id }, { op: "increment", value: 5 }, Date.now(), null);
    expect(await version()).toBe(2);
    const { record: next } = keyRecord();
    await store().rerollKey(k.id, next, Date.now() + 1000, Date.now());
    expect(await version(), "the old key's expiry is set").toBe(3);
    expect((await store().getKey(k.id))!.credits!.remaining).toBe(14);
  });

  it("raises an identity's version with its updates and credit changes, and its keys' when they are unlinked", async () => {
    const rec = identityRecord({ credits: { remaining: 10, refill: null } });
    await store().createIdentity(rec);
    const { record: k } = keyRecord({ identityId: rec.id });
    await store().createKey(k);
    await store().updateIdentity(rec.id, { meta: { a: 1 } }, Date.now());
    await store().spendCredits({ identityId: rec.id }, 3, null);
    await store().updateCredits({ identityId: rec.id }, { op: "set", value: 50 }, Date.now(), null);
    expect((await store().getIdentity(rec.id))!.version).toBe(2);
    await store().deleteIdentity(rec.id, false);
    expect((await store().getKey(k.id))!.version).toBe(1);
  });

  it("records every write of a key or identity, numbered without a gap", async () => {
    const rec = identityRecord();
    const { record: k } = keyRecord();
    const changes = await recorded(async () => {
      await store().createIdentity(rec);
      await store().createKey(k);
      await store().updateKey(k.id, { enabled: false }, Date.now());
      await store().updateIdentity(rec.id, { meta: { b: 2 } }, Date.now());
      await store().deleteKey(k.id);
    });
    expect(changes.map((c) => c.seq)).toEqual(changes.map((_, i) => changes[0].seq + i));
    const phases = phasesOf(changes);
    expect(phases.get(k.id)).toEqual([...once, ...once, ...once]);
    expect(phases.get(k.id)).toBeDefined();
    for (const c of changes) for (const t of c.keys) if (t.id === k.id) expect(t.hash).toBe(k.hash);
    expect(await store().changesSince(await store().lastChangeSeq(), 10)).toEqual([]);
  });

  it.each([true, false])("records an identity deleted with its keys (delete_keys %s) in a few entries, not one per key", async (deleteKeys) => {
    const rec = identityRecord();
    await store().createIdentity(rec);
    // (MongoDB unlinks each key under its own lock: 150 of them are enough to show the batches.)
    const n = kind === "mongodb" && !deleteKeys ? 150 : 600;
    const keys = Array.from({ length: n }, () => keyRecord({ identityId: rec.id }).record);
    if (kind === "embedded") for (const k of keys) await store().createKey(k);
    else await bulkInsertKeys(store(), keys);
    const changes = await recorded(() => store().deleteIdentity(rec.id, deleteKeys));
    // Batches of up to 500 keys (up to 50 when MongoDB unlinks each under its own lock), and the identity.
    if (kind === "embedded" || deleteKeys) expect(changes.length).toBe(3 * once.length);
    else expect(changes.length).toBeLessThan(keys.length / 5);
    const phases = phasesOf(changes);
    // (A MongoDB unlink batch whose time ran out hands its remaining keys to the next one.)
    for (const k of keys) expect(phases.get(k.id)?.slice(-once.length), k.id).toEqual(once);
    expect(phases.get(rec.id)).toEqual(once);
    const hashes = new Map(changes.flatMap((c) => c.keys.map((t) => [t.id, t.hash])));
    for (const k of keys) expect(hashes.get(k.id)).toBe(k.hash);
  }, 120_000);

  it("prunes only below a seq, never the newest entry, and starts a new reader at the oldest one left", async () => {
    const { record: k } = keyRecord();
    await store().createKey(k);
    for (let i = 0; i < 3; i++) await store().updateKey(k.id, { name: `n${i}` }, Date.now());
    const newest = await store().lastChangeSeq();
    await store().pruneChanges(newest);
    expect(await store().changeFeedStart()).toBe(newest - 1);
    expect((await store().changesSince(newest - 1, 10)).map((c) => c.seq)).toEqual([newest]);
    // The next entry follows the newest, pruned or not.
    await store().updateKey(k.id, { name: "after" }, Date.now());
    expect((await store().changesSince(newest, 10))[0].seq).toBe(newest + 1);
  });

  it("reads past a missing entry when asked to", async () => {
    const { record: k } = keyRecord();
    await store().createKey(k);
    const start = await store().lastChangeSeq();
    for (let i = 0; i < 3; i++) await store().updateKey(k.id, { name: `m${i}` }, Date.now());
    await deleteChange(kind, store(), start + 1);
    // Without pastGaps a store may stop at the missing entry (MongoDB looks up the next seq first).
    const plain = await store().changesSince(start, 100);
    expect(plain.length === 0 || plain[0].seq === start + 2).toBe(true);
    const past = await store().changesSince(start, 100, { pastGaps: true });
    expect(past[0].seq).toBe(start + 2);
  });

  it.runIf(kind === "mongodb")("drops whole buckets of entries below the seq, reads across buckets, and starts a reader at the entry left", async () => {
    // 2.5 buckets of entries in bulk after the newest.
    const { toFeedDoc, MongoStore } = await import("../../src/storage/mongodb/mongo-store.js");
    const ms = store() as InstanceType<typeof MongoStore>;
    const bucket = ms.feedBucket;
    const n = Math.round(bucket * 2.5);
    const s = store() as unknown as { db: { collection(n: string): { insertMany(d: unknown[]): Promise<unknown>; countDocuments(): Promise<number> } } };
    const first = (await store().lastChangeSeq()) + 1;
    const byBucket = new Map<string, unknown[]>();
    for (let seq = first; seq < first + n; seq++) {
      const name = ms.feedCollectionName(seq);
      byBucket.set(name, [...(byBucket.get(name) ?? []), toFeedDoc(seq, { phase: "intent", boundMs: 5000, keys: [], identities: [`id_${seq}`] })]);
    }
    for (const [name, docs] of byBucket) await s.db.collection(name).insertMany(docs);
    const last = first + n - 1;
    expect(await store().lastChangeSeq()).toBe(last);
    const read = await store().changesSince(first - 1, n * 2);
    expect(read.map((c) => c.seq)).toEqual(Array.from({ length: n }, (_, i) => first + i));

    await store().pruneChanges(last);
    const start = await store().changeFeedStart();
    expect(start).toBe(last - 1);
    expect(await s.db.collection(ms.feedCollectionName(first)).countDocuments()).toBe(0);
    expect((await store().changesSince(start, n * 2)).at(-1)?.seq).toBe(last);
  }, 60_000);
});

/** Keys inserted in bulk in the store's layout (MongoDB; through createKey each would be three round trips on FerretDB). */
async function bulkInsertKeys(store: Store, keys: ReturnType<typeof keyRecord>["record"][]): Promise<void> {
  await (store as MongoStore).loadKeys(keys);
}
