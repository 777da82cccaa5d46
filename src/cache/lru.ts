/**
 * A bounded map with per-entry expiry, evicting the least recently used entry.
 * Expired entries stay until evicted or replaced, unseen by `get` and `peek`:
 * `stale` still finds them (answers while the store cannot be reached).
 */
export class LruCache<K, V> {
  private readonly map = new Map<K, { value: V; expires: number; at: number }>();

  constructor(readonly max: number) {}

  get size(): number {
    return this.map.size;
  }

  /** The entry, or undefined when absent or expired. */
  get(key: K, now: number): { value: V } | undefined {
    const e = this.map.get(key);
    if (!e || e.expires <= now) return undefined;
    // Re-insert to mark as most recently used (Map keeps insertion order).
    this.map.delete(key);
    this.map.set(key, e);
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
    this.map.set(key, { value, expires, at });
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
