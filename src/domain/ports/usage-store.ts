import type { Granularity, UsageQuery, UsageRow } from "../usage.js";

/** Where usage counts are kept. */
export interface UsageStore {
  /**
   * Adds minute usage rows to the stored counts (an atomic increment per row);
   * the store derives the hour and day counts from them (and refuses rows of
   * another granularity). A row already incremented by the same `batch` (writer
   * and seq) is not incremented again, so a retried batch is never counted twice.
   */
  writeUsage(rows: UsageRow[], batch: { writer: string; seq: number }): Promise<void>;
  /** Rows of one identity or key in a range; throws InvalidArgumentError past `maxRows`. */
  queryUsage(q: UsageQuery): Promise<UsageRow[]>;
  /** Raises keys' last_used_at to the given times (never lowers it). No change event. */
  touchLastUsed(times: Map<string, number>): Promise<void>;
  /** Deletes rows of a granularity with a bucket before `before`. */
  pruneUsage(granularity: Granularity, before: number): Promise<void>;
}
