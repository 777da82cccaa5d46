/**
 * A bounded map with per-entry expiry, evicting the least recently used entry.
 * Expired entries stay until evicted or replaced, unseen by `get` and `peek`:
 * `stale` still finds them (answers while the store cannot be reached).
 *
 * Recency is kept by the Map's order (an entry used moves to the end, the first
 * one is evicted), but a `get` moves an entry only once it has aged past half the
 * capacity: an entry placed or moved fewer than max / 2 placements ago is already
 * among the newer half, and a delete and re-insert on every hit was most of a
 * cached verification's cache lookup (two per call, docs/performance.md, step 8f).
 * So an entry used is kept for at least max / 2 placements after that use (a strict
 * LRU: max), and an entry never used again goes first, as before.
 */
export class LruCache<K, V> {
  private readonly map = new Map<K, { value: V; expires: number; at: number; placed: number }>();
  /** Placements so far (sets and moves): an entry's `placed` is this count when it went to the end. */
  private placements = 0;

  constructor(readonly max: number) {}

  get size(): number {
    return this.map.size;
  }

  /** The entry, or undefined when absent or expired. */
  get(key: K, now: number): { value: V } | undefined {
    const e = this.map.get(key);
    if (!e || e.expires <= now) return undefined;
    if (this.placements - e.placed > this.max >>> 1) {
      // Re-insert to mark as most recently used (Map keeps insertion order).
      this.map.delete(key);
      this.map.set(key, e);
      e.placed = ++this.placements;
    }
    return e;
  }

  /** The entry without marking it used, or undefined when absent or expired. */
  peek(key: K, now: number): { value: V } | undefined {
    const e = this.map.get(key);
    return e && e.expires > now ? e : undefined;
  }

  /** The entry, expired or not, with `at` as given to `set`. */
  stale(key: K): { value: V; at: number } | undefined {
    return this.map.get(key);
  }

  /** `at`: when the value was read (for `stale`), on the caller's clock. */
  set(key: K, value: V, expires: number, at = 0): void {
    this.map.delete(key);
    if (this.map.size >= this.max) this.map.delete(this.map.keys().next().value as K);
    this.map.set(key, { value, expires, at, placed: ++this.placements });
  }

  /** Replaces the value of an entry that is present, keeping its expiry and time. */
  replace(key: K, value: V): void {
    const e = this.map.get(key);
    if (e) e.value = value;
  }

  delete(key: K): void {
    this.map.delete(key);
  }

  clear(): void {
    this.map.clear();
  }
}
