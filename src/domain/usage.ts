/** Usage counters, in this order, in every row and bucket. */
export const COUNTERS = [
  "total",
  "valid",
  "notFound",
  "disabled",
  "expired",
  "insufficientPermissions",
  "rateLimited",
  "usageExceeded",
  "creditsSpent",
] as const;
export type CounterName = (typeof COUNTERS)[number];
export type Counts = Record<CounterName, number>;

export type Granularity = "minute" | "hour" | "day";
export const BUCKET_MS: Record<Granularity, number> = { minute: 60_000, hour: 3_600_000, day: 86_400_000 };

/**
 * One stored usage row: the verifications of one key (and the identity it had
 * at the time) in one time bucket, for all verifications (tag "") or for those
 * carrying one tag.
 */
export interface UsageRow {
  granularity: Granularity;
  /** Bucket start, epoch ms (UTC). */
  bucket: number;
  keyId: string;
  identityId: string | null;
  tag: string;
  counts: Counts;
}

export interface UsageQuery {
  by: { identityId: string } | { keyId: string };
  granularity: Granularity;
  start: number;
  end: number;
  /** "" rows (all verifications) or tagged rows. */
  tagged: boolean;
  /** Refuse to read more rows than this. */
  maxRows: number;
}

export function emptyCounts(): Counts {
  return { total: 0, valid: 0, notFound: 0, disabled: 0, expired: 0, insufficientPermissions: 0, rateLimited: 0, usageExceeded: 0, creditsSpent: 0 };
}

export function addCounts(into: Counts, from: Counts): void {
  for (const c of COUNTERS) into[c] += from[c];
}
