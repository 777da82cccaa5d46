/**
 * last_used_at is written when a process first sees a key in use, then again
 * only once it would move by `lastUsedResolutionMs`; a failed write holds
 * nothing back; 0 writes it on every flush (the recorder's unit, with a store
 * that records what it is asked to write).
 */
import { Writable } from "node:stream";
import { describe, expect, it } from "vitest";
import type { KeyRecord } from "../../src/domain/types.js";
import type { Verification, VerifyInput } from "../../src/domain/verify.js";
import { createLogger } from "../../src/observability/logger.js";
import type { Store } from "../../src/storage/store.js";
import { createUsageRecorder } from "../../src/usage/recorder.js";

const quiet = createLogger("silent", new Writable({ write: (_c, _e, cb) => cb() }));
const input: VerifyInput = { key: "k", apiId: "api", permissions: "", ratelimits: [], cost: null, tags: [] };
const verification = (keyId: string): Verification => ({
  code: "VALID",
  key: { id: keyId, identityId: null } as KeyRecord,
  identity: null,
  creditsRemaining: null,
  ratelimits: [],
  spent: 0,
});

function harness(lastUsedResolutionMs: number) {
  const touches: Record<string, number>[] = [];
  let failNext = false;
  const store = {
    writeUsage: async () => {},
    touchLastUsed: async (times: Map<string, number>) => {
      if (failNext) {
        failNext = false;
        throw new Error("injected");
      }
      touches.push(Object.fromEntries(times));
    },
    pruneUsage: async () => {},
  } as unknown as Store;
  const recorder = createUsageRecorder({
    store,
    logger: quiet,
    options: { flushMs: 60_000, minuteRetentionMs: 3_600_000, hourRetentionMs: 86_400_000, lastUsedResolutionMs },
  });
  return { recorder, touches, failOnce: () => (failNext = true) };
}

describe("last_used_at resolution", () => {
  const t0 = Date.now();

  it("writes a key's first use, holds back uses within the resolution, writes the first one past it", async () => {
    const { recorder, touches } = harness(60_000);
    recorder.record(verification("key_a"), input, t0);
    recorder.record(verification("key_b"), input, t0 + 5);
    await recorder.flush();
    expect(touches).toEqual([{ key_a: t0, key_b: t0 + 5 }]);

    recorder.record(verification("key_a"), input, t0 + 30_000); // moves it by 30 s: held back
    recorder.record(verification("key_b"), input, t0 + 60_005); // by exactly the resolution: written
    await recorder.flush();
    expect(touches).toEqual([{ key_a: t0, key_b: t0 + 5 }, { key_b: t0 + 60_005 }]);

    recorder.record(verification("key_a"), input, t0 + 60_001);
    recorder.record(verification("key_a"), input, t0 - 1_000); // older than written: never lowers it
    await recorder.flush();
    expect(touches.at(-1)).toEqual({ key_a: t0 + 60_001 });
  });

  it("a failed write holds nothing back: the next flush writes it, and a later use is not held back by it", async () => {
    const { recorder, touches, failOnce } = harness(60_000);
    recorder.record(verification("key_a"), input, t0);
    failOnce();
    await expect(recorder.flush()).rejects.toThrow("injected");
    recorder.record(verification("key_a"), input, t0 + 1_000);
    await recorder.flush();
    expect(touches).toEqual([{ key_a: t0 + 1_000 }]);
  });

  it("0 writes it on every flush that saw the key", async () => {
    const { recorder, touches } = harness(0);
    for (let i = 1; i <= 3; i++) {
      recorder.record(verification("key_a"), input, t0 + i);
      await recorder.flush();
    }
    expect(touches).toEqual([{ key_a: t0 + 1 }, { key_a: t0 + 2 }, { key_a: t0 + 3 }]);
  });
});
