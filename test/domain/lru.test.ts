/**
 * The verification cache's LRU (src/cache/lru.ts): bounded, expiring, evicting
 * the least recently used entry — with a hit moving an entry to the newest end
 * only once it has aged past half the capacity. What that must still give: an
 * entry used is kept for at least max / 2 placements after the use, an entry
 * never used goes before one used, and expiry, `stale` and `peek` as before.
 */
import { describe, expect, it } from "vitest";
import { LruCache } from "../../src/cache/lru.js";

const T = 1_000;
const LATER = T + 60_000;

describe("LruCache", () => {
  it("holds at most max entries, evicting those never used first", () => {
    const c = new LruCache<string, number>(4);
    for (const k of ["a", "b", "c", "d"]) c.set(k, 1, LATER);
    // "a" and "b" are the older half: a hit moves them to the newest end.
    expect(c.get("a", T)?.value).toBe(1);
    expect(c.get("b", T)?.value).toBe(1);
    c.set("e", 1, LATER);
    c.set("f", 1, LATER);
    expect(c.size).toBe(4);
    expect(["a", "b", "c", "d", "e", "f"].filter((k) => c.peek(k, T))).toEqual(["a", "b", "e", "f"]);
  });

  it("keeps an entry used within the newer half for at least max / 2 placements after that use", () => {
    const max = 100;
    const c = new LruCache<string, number>(max);
    for (let i = 0; i < max; i++) c.set(`k${i}`, i, LATER);
    // k99 was placed last: a hit leaves it where it is (the newer half) ...
    c.get("k99", T);
    // ... and it is still there max / 2 placements later, while older unused entries went.
    for (let i = 0; i < max / 2; i++) c.set(`n${i}`, i, LATER);
    expect(c.peek("k99", T)?.value).toBe(99);
    expect(c.peek("k0", T)).toBeUndefined();
    // An entry used again and again is never evicted, however many entries come and go.
    for (let i = 0; i < 10 * max; i++) {
      c.get("k99", T);
      c.set(`m${i}`, i, LATER);
    }
    expect(c.peek("k99", T)?.value).toBe(99);
    expect(c.size).toBe(max);
  });

  it("does not answer an expired entry from get or peek, and still from stale", () => {
    const c = new LruCache<string, number>(10);
    c.set("a", 7, T + 10, 5);
    expect(c.get("a", T + 9)?.value).toBe(7);
    expect(c.get("a", T + 10)).toBeUndefined();
    expect(c.peek("a", T + 10)).toBeUndefined();
    expect(c.stale("a")).toMatchObject({ value: 7, at: 5 });
  });

  it("replaces a value in place, and a set of a present key moves it to the newest end", () => {
    const c = new LruCache<string, number>(2);
    c.set("a", 1, LATER);
    c.set("b", 2, LATER);
    c.replace("a", 10);
    expect(c.get("a", T)?.value).toBe(10);
    c.set("a", 11, LATER);
    c.set("c", 3, LATER);
    expect(c.peek("a", T)?.value).toBe(11);
    expect(c.peek("b", T)).toBeUndefined();
  });
});
