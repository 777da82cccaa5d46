import type { MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromMs, timestampMs, type Timestamp } from "@bufbuild/protobuf/wkt";
import { RefillInterval, type RatelimitSchema } from "../../gen/latchkey/v1/common_pb.js";

/** Small builders for request messages, so tests read as data. */

export function ratelimit(name: string, limit: number, seconds: number, autoApply = false): MessageInitShape<typeof RatelimitSchema> {
  return { name, limit: BigInt(limit), duration: { seconds: BigInt(seconds), nanos: 0 }, autoApply };
}

export function mask(...paths: string[]) {
  return { paths };
}

export function credits(remaining: number, refill?: { interval: "daily" | "monthly"; amount: number; day?: number }) {
  return {
    remaining: BigInt(remaining),
    refill: refill
      ? {
          interval: refill.interval === "daily" ? RefillInterval.DAILY : RefillInterval.MONTHLY,
          amount: BigInt(refill.amount),
          refillDay: refill.day ?? 0,
        }
      : undefined,
  };
}

export const at = (ms: number): Timestamp => timestampFromMs(ms);
export const msOf = (t: Timestamp | undefined): number | null => (t ? timestampMs(t) : null);
