/**
 * Window counters behind rate limits: fixed windows of the limit's duration,
 * aligned to multiples of it (window n covers [n·d, (n+1)·d) on the counter's
 * clock), one count per (counter key, window). Implemented in src/ratelimit/.
 *
 * Admission is exact: `take` adds the cost only when it fits under the limit, in
 * one atomic step of the backend, so a call is refused only when it alone does
 * not fit — never because a concurrent refused call's tokens are counted for a
 * moment (with the Redis backend's leases: or when the rest of the window is
 * leased by other instances; never more than the limit either way).
 * `refund` gives tokens back to the window they were taken from, named
 * by its number, or nowhere when that window has ended: a refund never lowers
 * the next window. See docs/credits.md ("Rate-limit windows", "Rate-limit leases").
 */
export interface RateLimitCounter {
  readonly kind: "memory" | "mongodb" | "redis";
  /**
   * Takes `cost` from the current window of `key` if the window's total plus
   * `cost` stays within `limit`; a cost of 0 checks that something is left
   * (total < limit) and takes nothing. `total` is the window's count after the
   * call (unchanged when refused).
   */
  take(key: string, cost: number, limit: number, durationMs: number): Promise<Taken>;
  /** Gives `cost` back to window `window` of `key`, if that window is still counted; never below zero. */
  refund(key: string, cost: number, durationMs: number, window: number): Promise<void>;
}

export interface Taken {
  ok: boolean;
  total: number;
  /** The window's number (its start is window × duration). */
  window: number;
  /** End of the window, epoch ms on the counter's clock. */
  resetAt: number;
}
