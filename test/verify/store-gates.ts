/**
 * Gates in front of store methods, for races and faults on purpose: a gate
 * holds the next matching call of a method until the test releases it (or
 * fails it), and tells the test when the call has reached it. Calls that no
 * gate matches go straight to the real store.
 */
import type { Store } from "../../src/storage/store.js";

export interface Gate {
  /** Resolves with the call's arguments once a matching call is held. */
  readonly reached: Promise<unknown[]>;
  /** Lets the held call go on to the real store. */
  release(): void;
  /** Makes the held call fail with `err` without reaching the store. */
  fail(err: Error): void;
}

type Armed = { method: string; match: (args: unknown[]) => boolean; reached: (args: unknown[]) => void; go: Promise<Error | null> };

export interface GatedStore {
  store: Store;
  /** Holds the next call of `method` whose arguments `match` (default: any). */
  hold(method: keyof Store, match?: (args: unknown[]) => boolean): Gate;
  /** Makes every call of `method` fail with `err` until the returned function is called. */
  failAll(method: keyof Store, err: () => Error): () => void;
  /** Calls per method since the last reset. */
  calls: Map<string, number>;
  reset(): void;
}

/** Wraps `store`; the real store does the work of every call a gate lets through. */
export function gatedStore(store: Store): GatedStore {
  const armed: Armed[] = [];
  const failing = new Map<string, () => Error>();
  const calls = new Map<string, number>();
  const wrapped = new Proxy(store, {
    get(target, prop, receiver) {
      const v = Reflect.get(target, prop, receiver);
      if (typeof v !== "function") return v;
      const name = String(prop);
      return async (...args: unknown[]) => {
        calls.set(name, (calls.get(name) ?? 0) + 1);
        const fail = failing.get(name);
        if (fail) throw fail();
        const i = armed.findIndex((a) => a.method === name && a.match(args));
        if (i >= 0) {
          const [a] = armed.splice(i, 1);
          a.reached(args);
          const err = await a.go;
          if (err) throw err;
        }
        return (v as (...a: unknown[]) => unknown).apply(target, args);
      };
    },
  });
  return {
    store: wrapped,
    calls,
    reset: () => calls.clear(),
    hold(method, match = () => true) {
      let reached!: (args: unknown[]) => void;
      let go!: (e: Error | null) => void;
      const gate: Gate = {
        reached: new Promise((r) => (reached = r)),
        release: () => go(null),
        fail: (err) => go(err),
      };
      armed.push({ method, match, reached, go: new Promise((r) => (go = r)) });
      return gate;
    },
    failAll(method, err) {
      failing.set(method, err);
      return () => failing.delete(method);
    },
  };
}

/**
 * A network fault in the middle of a MongoStore operation: once `method` of
 * the collection held in the store's field `field` has succeeded, every later
 * call on any of the store's collections fails as a lost connection would,
 * until `heal()`. `field` may also name one of the store's databases (`db`;
 * `buckets`: the bucketed key layout's), for a call on any collection of
 * them. (Reaches into the store's private fields: the fault sits
 * between two driver calls of one store method.)
 */
export function severAfter(store: Store, field: string, method: string): { severed(): boolean; heal(): void } {
  let severed = false;
  const target = store as unknown as Record<string, unknown>;
  const originals = new Map<string, unknown>();
  const dbFields = new Set<string>();
  const restore: (() => void)[] = [];
  const lost = (prop: string | symbol) => {
    const err = new Error("connection lost (injected)");
    err.name = "MongoNetworkError";
    // find() answers a cursor, the rest a promise: fail where the caller waits.
    const failed = Promise.reject(err);
    failed.catch(() => undefined);
    return prop === "find" ? { toArray: () => failed, next: () => failed, sort: () => ({ limit: () => ({ next: () => failed, toArray: () => failed }) }) } : failed;
  };
  const wrap = (coll: object, name: string) =>
    new Proxy(coll, {
      get(c, prop, receiver) {
        const v = Reflect.get(c, prop, receiver);
        if (typeof v !== "function") return v;
        return (...args: unknown[]) => {
          if (severed) return lost(prop);
          const res = (v as (...a: unknown[]) => unknown).apply(c, args);
          if (name === field && prop === method) {
            return (res as Promise<unknown>).then((r) => {
              severed = true;
              return r;
            });
          }
          return res;
        };
      },
    });
  for (const [name, value] of Object.entries(target)) {
    if (!value || typeof value !== "object") continue;
    if (value.constructor?.name === "Collection") {
      originals.set(name, value);
      target[name] = wrap(value, name);
    } else if (value.constructor?.name === "Db") {
      // Collections the store asks a Db for later (the change feed's) fail the same way.
      const db = value as { collection: (n: string) => object };
      const collection = db.collection;
      restore.push(() => (db.collection = collection));
      dbFields.add(name);
      db.collection = (n: string) => wrap(collection.call(db, n), name);
    } else if (typeof (value as { byHash?: unknown }).byHash === "function") {
      // The key buckets of the bucketed layout (key-layout.ts createKeyBuckets): every bucket they hand out.
      const b = value as { byHash: (h: string) => object; byId: (id: string) => object; hashBuckets: () => Promise<object[]> };
      const { byHash, byId, hashBuckets } = b;
      restore.push(() => Object.assign(b, { byHash, byId, hashBuckets }));
      dbFields.add(name);
      b.byHash = (h: string) => wrap(byHash.call(b, h), name);
      b.byId = (id: string) => wrap(byId.call(b, id), name);
      b.hashBuckets = async () => (await hashBuckets.call(b)).map((c) => wrap(c, name));
    }
  }
  if (!originals.has(field) && !dbFields.has(field)) throw new Error(`no collection or database field ${field} on the store`);
  return {
    severed: () => severed,
    heal() {
      severed = false;
      for (const [name, value] of originals) target[name] = value;
      for (const r of restore) r();
    },
  };
}

/**
 * Deletes one entry of the change feed behind the store's back: a lost (or
 * pruned) change. Also in the tables of earlier versions, to show how their
 * reader fares.
 */
export async function deleteChange(kind: "embedded" | "mongodb", store: Store, seq: number): Promise<void> {
  const s = store as unknown as Record<string, any>;
  if (kind === "embedded") {
    const table = s.db.prepare("SELECT name FROM sqlite_master WHERE name = 'change_feed'").get() ? "change_feed" : "changes";
    s.db.prepare(`DELETE FROM ${table} WHERE seq = ?`).run(seq);
  } else if (s.changes) {
    await s.changes.deleteOne({ _id: seq });
  } else {
    await s.db.collection(s.feedCollectionName(seq)).deleteOne({ _id: String(seq).padStart(16, "0") });
  }
}
