import type { CommitSignal } from "../../src/storage/store.js";

/**
 * A call's state as the lean gRPC path hands it to a spend (src/server/grpc-unary.ts):
 * not an AbortSignal, which it makes only when `toAbortSignal` is asked.
 */
export function callState(): { signal: CommitSignal; end(reason: unknown): void; madeSignals: () => number } {
  let aborted = false;
  let reason: unknown;
  const made: AbortController[] = [];
  return {
    signal: {
      get aborted() {
        return aborted;
      },
      get reason() {
        return reason;
      },
      throwIfAborted() {
        if (aborted) throw reason;
      },
      toAbortSignal() {
        const c = new AbortController();
        if (aborted) c.abort(reason);
        made.push(c);
        return c.signal;
      },
    },
    end(r: unknown) {
      aborted = true;
      reason = r;
      for (const c of made) c.abort(r);
    },
    madeSignals: () => made.length,
  };
}
