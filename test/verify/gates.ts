/**
 * Gates for fault tests: wrap a port (store, counter) so that calls of one
 * method are held until the test releases them, or observed as they pass. The
 * wrapped object does the real work; nothing is faked.
 */

export interface Gate<A extends unknown[] = unknown[]> {
  /** Resolves with the arguments of the first held call once it has arrived. */
  readonly arrived: Promise<A>;
  /** Lets every held call (and every later one) through. */
  release(): void;
  /** Calls held right now. */
  held(): number;
}

/**
 * Wraps `target` so that calls of `method` for which `when` (default: every
 * call) is true wait at the gate until `release()`; other calls pass at once.
 */
export function gated<T extends object, A extends unknown[] = unknown[]>(
  target: T,
  method: keyof T & string,
  when: (...args: A) => boolean = () => true,
): { wrapped: T; gate: Gate<A> } {
  let open = false;
  const waiting: (() => void)[] = [];
  let arrive!: (args: A) => void;
  const arrived = new Promise<A>((r) => (arrive = r));
  const wrapped = new Proxy(target, {
    get(t, prop, receiver) {
      const v = Reflect.get(t, prop, receiver);
      if (prop !== method || typeof v !== "function") return typeof v === "function" ? v.bind(t) : v;
      return async (...args: A) => {
        if (!open && when(...args)) {
          arrive(args);
          await new Promise<void>((r) => waiting.push(r));
        }
        return (v as (...a: A) => unknown).apply(t, args);
      };
    },
  });
  return {
    wrapped,
    gate: {
      arrived,
      release() {
        open = true;
        for (const go of waiting.splice(0)) go();
      },
      held: () => waiting.length,
    },
  };
}

/** Wraps `target` so that `after(result, args)` runs when a call of `method` has resolved, before its caller sees it. */
export function observed<T extends object>(target: T, method: keyof T & string, after: (result: unknown, args: unknown[]) => void): T {
  return new Proxy(target, {
    get(t, prop, receiver) {
      const v = Reflect.get(t, prop, receiver);
      if (prop !== method || typeof v !== "function") return typeof v === "function" ? v.bind(t) : v;
      return async (...args: unknown[]) => {
        const res = await (v as (...a: unknown[]) => unknown).apply(t, args);
        after(res, args);
        return res;
      };
    },
  });
}
