import { EventEmitter } from "node:events";
import { StoreUnreachableError } from "../domain/errors.js";
import type { Logger } from "../observability/logger.js";
import type { Store } from "./store.js";

/*
 * A circuit breaker in front of a store (README, "Store outages"). While the
 * store answers, calls pass through. When a call fails because the store could
 * not be reached (StoreUnreachableError) the store is probed at once — a ping
 * that must answer within `probeTimeoutMs` — and the health service's periodic
 * ping is the same probe. A probe that fails or does not answer in time marks
 * the store unreachable:
 *
 * - calls that need it fail with UNAVAILABLE without reaching it — at once, or
 *   after waiting up to `failFastMs` for it to come back; a write refused this
 *   way was never sent, so its error says "nothing was written";
 * - reads in flight are released with UNAVAILABLE (their late answers are
 *   dropped); writes in flight are left to end with the store's own answer,
 *   since a write already sent may or may not have been applied;
 * - a probe stays in flight (a new one at least every `retryMs`, each allowed
 *   `probeTimeoutMs`, the MongoDB driver's own wait for a server running on),
 *   and the first that answers marks the store reachable again.
 *
 * Generic: a Proxy in front of any object implementing the Store port, with
 * each method classified once below (the compiler checks that every Store
 * method is), not hand-written delegation.
 */

/** What a method needs of the store. */
type Access = "read" | "write" | "free" | "ping" | "open" | "close";

const STORE_METHODS: Record<keyof Store, Access> = {
  kind: "free",
  capabilities: "free",
  init: "open",
  ping: "ping",
  close: "close",
  createIdentity: "write",
  ensureIdentity: "write",
  getIdentity: "read",
  getIdentityByExternalId: "read",
  getIdentities: "read",
  listIdentities: "read",
  updateIdentity: "write",
  deleteIdentity: "write",
  createKey: "write",
  getKey: "read",
  getKeyByHash: "read",
  listKeys: "read",
  updateKey: "write",
  deleteKey: "write",
  rerollKey: "write",
  updateCredits: "write",
  spendCredits: "write",
  returnCredits: "write",
  changesSince: "read",
  changeFeedStart: "read",
  lastChangeSeq: "read",
  pruneChanges: "write",
  writeUsage: "write",
  queryUsage: "read",
  touchLastUsed: "write",
  pruneUsage: "write",
  createRootKey: "write",
  getRootKeyByHash: "read",
  listRootKeys: "read",
  deleteRootKey: "write",
  createFirstRootKey: "write",
};

/** Methods of the MongoDB store beyond the port, which the credit ledger in front of it calls (redis-credits.ts). */
const MONGO_EXTRA_METHODS: Record<string, Access> = { readCreditsHolder: "read", persistCredits: "write" };

export interface StoreGuardOptions {
  /** A probe (ping) not answered within this long has failed: the store is then unreachable. */
  probeTimeoutMs: number;
  /** Once the store is known unreachable, how long a call that needs it waits for it to come back before failing; 0 fails at once. */
  failFastMs: number;
  /** Least time between the starts of two probes while the store is unreachable. Default 100 ms. */
  retryMs?: number;
}

/** Why a call was refused without reaching the store. */
export class StoreRefusedError extends StoreUnreachableError {}

export interface StoreGuard<T extends Store = Store> {
  /** The store, guarded. */
  readonly store: T;
  /**
   * Guards a layer in front of the guarded store (the credit ledger) with the
   * same breaker: its methods are refused while the store is unreachable,
   * except `free` ones, which need none of it (spends from Redis). Its writes
   * are refused before they start, so they say "nothing was written"; the
   * inner store's then no longer do (the outer write may have done part of its
   * work elsewhere by then).
   */
  wrap<U extends object>(outer: U, free: (keyof U & string)[]): U;
  /** Whether the store was reachable at the last probe (or call). */
  reachable(): boolean;
  /** Milliseconds since the store was found unreachable (0 while reachable). */
  unreachableForMs(): number;
  /** "change" (reachable: boolean) on each transition; "refused" (access) for each call refused. */
  readonly events: EventEmitter;
  /** Probes the store now (joins a probe in flight); rejects when it is unreachable. */
  probe(): Promise<void>;
  /** Probes the store soon, if it is thought reachable: for signs from outside the calls (the MongoDB driver losing its server). */
  suspect(): void;
  /** Stops probing (the store is being closed). */
  stop(): void;
}

const guards = new WeakMap<object, StoreGuard<Store>>();

/** The guard in front of `store`, if it is a guarded store (or a layer guarded with it). */
export function storeGuardOf(store: object): StoreGuard<Store> | null {
  return guards.get(store) ?? null;
}

function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

const sleep = (ms: number) =>
  new Promise<void>((r) => {
    const t = setTimeout(r, ms);
    t.unref();
  });

/** `p`, or a StoreUnreachableError once `ms` have passed (`p` is then left to end on its own). */
function within<V>(p: Promise<V>, ms: number): Promise<V> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new StoreUnreachableError(`the store did not answer a ping within ${ms} ms`)), ms);
  });
  p.catch(() => undefined);
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

/**
 * Puts a circuit breaker in front of `store` (see the comment at the top of
 * this file). The store's own `ping` is the probe.
 */
export function createStoreGuard<T extends Store>(store: T, options: StoreGuardOptions, deps: { logger?: Logger; now?: () => number } = {}): StoreGuard<T> {
  const now = deps.now ?? Date.now;
  const retryMs = options.retryMs ?? 100;
  const events = new EventEmitter();
  events.setMaxListeners(0);
  let up = true;
  let downSince = 0;
  let stopped = false;
  let layered = false;
  let probing: Promise<void> | null = null;
  let back = deferred();
  /** Rejecters of the reads in flight, released when the store turns unreachable. */
  const reads = new Set<(err: Error) => void>();

  const rawPing = () => store.ping();

  function refusal(access: Access, claim: boolean): StoreRefusedError {
    const s = Math.round(unreachableForMs() / 100) / 10;
    const written = access === "write" && claim ? "; nothing was written" : "";
    return new StoreRefusedError(`the store is unreachable (for ${s} s)${written}; retry later`);
  }

  /** Refuses a call without sending it (counted for the metrics). */
  function refuse(access: Access, claim: boolean): StoreRefusedError {
    events.emit("refused", access === "write" ? "write" : "read");
    return refusal(access, claim);
  }

  function unreachableForMs(): number {
    return up ? 0 : Math.max(0, now() - downSince);
  }

  function trip(why: string): void {
    if (!up || stopped) return;
    up = false;
    downSince = now();
    deps.logger?.warn(
      { reason: why },
      "store unreachable: calls that need it fail with UNAVAILABLE; VerifyKey answers from the cache; probing until it answers",
    );
    const released = new StoreUnreachableError("the store became unreachable while this call waited for it");
    for (const reject of reads) reject(released);
    reads.clear();
    events.emit("change", false);
    void recover();
  }

  function recovered(): void {
    if (up) return;
    const ms = now() - downSince;
    up = true;
    deps.logger?.info({ unreachableMs: ms }, "store reachable again");
    const b = back;
    back = deferred();
    b.resolve();
    events.emit("change", true);
  }

  /** While unreachable: one probe after another until one answers. */
  async function recover(): Promise<void> {
    while (!up && !stopped) {
      const started = now();
      try {
        await within(rawPing(), options.probeTimeoutMs);
        recovered();
        return;
      } catch {
        // still unreachable
      }
      const wait = retryMs - (now() - started);
      if (wait > 0) await sleep(wait);
    }
  }

  function probe(): Promise<void> {
    if (!up) return Promise.reject(refusal("read", false));
    probing ??= within(rawPing(), options.probeTimeoutMs).then(
      () => {
        probing = null;
      },
      (err: Error) => {
        probing = null;
        trip(err.message);
        throw err instanceof StoreUnreachableError ? err : new StoreUnreachableError(`store ping failed: ${err.message}`);
      },
    );
    return probing;
  }

  /** Something suggests the store is gone (a failed call, the driver losing its server): find out now. */
  function suspect(): void {
    if (up && !stopped) void probe().catch(() => undefined);
  }

  /** Runs a read, released with UNAVAILABLE if the store turns unreachable before it answers. */
  function releasable<V>(p: Promise<V>): Promise<V> {
    return new Promise<V>((resolve, reject) => {
      reads.add(reject);
      p.then(
        (v) => {
          reads.delete(reject);
          resolve(v);
        },
        (err) => {
          reads.delete(reject);
          reject(err);
        },
      );
    });
  }

  function invoke(target: object, fn: (...a: unknown[]) => unknown, access: Access, args: unknown[]): Promise<unknown> {
    const p = Promise.resolve(fn.apply(target, args)) as Promise<unknown>;
    const guarded = access === "read" ? releasable(p) : p;
    return guarded.catch((err: unknown) => {
      if (err instanceof StoreUnreachableError && !(err instanceof StoreRefusedError)) suspect();
      throw err;
    });
  }

  async function call(target: object, fn: (...a: unknown[]) => unknown, access: Access, args: unknown[], claim: () => boolean): Promise<unknown> {
    if (!up) {
      if (options.failFastMs > 0) await Promise.race([back.promise, sleep(options.failFastMs)]);
      if (!up) throw refuse(access, claim());
    }
    return invoke(target, fn, access, args);
  }

  function guard<U extends object>(target: U, table: Record<string, Access>, claim: () => boolean): U {
    const wrappers = new Map<string, { fn: unknown; wrapper: unknown }>();
    const proxy = new Proxy(target, {
      get(t, prop) {
        const v = Reflect.get(t, prop, t) as unknown;
        if (typeof prop !== "string" || typeof v !== "function") return v;
        const cached = wrappers.get(prop);
        if (cached && cached.fn === v) return cached.wrapper;
        const fn = v as (...a: unknown[]) => unknown;
        const access = table[prop];
        let wrapper: unknown;
        if (access === "read" || access === "write") {
          wrapper = (...args: unknown[]) => {
            // At once, without a promise chain, when there is nothing to wait for.
            if (!up && options.failFastMs <= 0) return Promise.reject(refuse(access, claim()));
            return call(t, fn, access, args, claim);
          };
        } else if (access === "ping" && t === (store as object)) {
          wrapper = () => probe();
        } else if (access === "ping") {
          // An outer layer's ping (the store's and its own dependencies'): refused while the store is unreachable.
          wrapper = (...args: unknown[]) => call(t, fn, "read", args, claim);
        } else if (access === "close") {
          wrapper = (...args: unknown[]) => {
            stopped = true;
            return fn.apply(t, args);
          };
        } else {
          wrapper = fn.bind(t);
        }
        wrappers.set(prop, { fn: v, wrapper });
        return wrapper;
      },
    });
    return proxy;
  }

  const guarded = guard(store, { ...MONGO_EXTRA_METHODS, ...STORE_METHODS }, () => !layered);
  const self: StoreGuard<T> = {
    store: guarded,
    wrap(outer, free) {
      layered = true;
      const table: Record<string, Access> = { ...STORE_METHODS, ...MONGO_EXTRA_METHODS };
      for (const name of free) table[name] = "free";
      const wrapped = guard(outer, table, () => true);
      guards.set(wrapped, self as unknown as StoreGuard<Store>);
      return wrapped;
    },
    reachable: () => up,
    unreachableForMs,
    events,
    probe,
    suspect,
    stop() {
      stopped = true;
    },
  };
  guards.set(guarded, self as unknown as StoreGuard<Store>);
  return self;
}
