import type { Principal } from "./access.js";
import { InvalidArgumentError, NotFoundError } from "./errors.js";
import type { IdentityLookup } from "./identities.js";
import { ID_PATTERNS } from "./ids.js";
import { checkExternalId, checkId } from "./validation.js";
import type { IdentityRepository } from "./ports/identities.js";
import type { KeyRepository } from "./ports/keys.js";
import type { UsageStore } from "./ports/usage-store.js";
import { BUCKET_MS, addCounts, emptyCounts, type CounterName, type Counts, type Granularity, type UsageRow } from "./usage.js";
import { groupBy } from "./group-by.js";

export type GroupBy = "none" | "key" | "outcome" | "tag";

export interface UsageRequest {
  start: number | null;
  end: number | null;
  granularity: Granularity | null;
  groupBy: GroupBy;
}

export interface UsageSeries {
  group: string;
  totals: Counts;
  points: { time: number; counts: Counts }[];
}

export interface UsageReport {
  start: number;
  end: number;
  totals: Counts;
  series: UsageSeries[];
}

/** Longest range answered per granularity: 24 hours of minutes, 31 days of hours, 400 days. */
export const MAX_RANGE_MS: Record<Granularity, number> = { minute: 86_400_000, hour: 31 * 86_400_000, day: 400 * 86_400_000 };
const RANGE_TEXT: Record<Granularity, string> = { minute: "24 hours", hour: "31 days", day: "400 days" };
const MAX_ROWS = 200_000;
const MAX_SERIES = 1000;

const OUTCOMES: [string, CounterName][] = [
  ["VALID", "valid"],
  ["NOT_FOUND", "notFound"],
  ["DISABLED", "disabled"],
  ["EXPIRED", "expired"],
  ["INSUFFICIENT_PERMISSIONS", "insufficientPermissions"],
  ["RATE_LIMITED", "rateLimited"],
  ["USAGE_EXCEEDED", "usageExceeded"],
];

/** GetIdentityUsage and GetKeyUsage: range checks, reading rows, series with empty buckets filled. */
export function createUsageReader(deps: {
  store: Pick<UsageStore, "queryUsage"> & Pick<IdentityRepository, "getIdentityByExternalId"> & Pick<KeyRepository, "getKey">;
  minuteRetentionMs: number;
  hourRetentionMs?: number;
  /** null or absent: day rows are kept for ever. */
  dayRetentionMs?: number | null;
  now?: () => number;
}) {
  const { store } = deps;
  const now = deps.now ?? Date.now;

  function range(req: UsageRequest): { start: number; end: number; granularity: Granularity } {
    if (!req.granularity) throw new InvalidArgumentError("granularity", "is required: MINUTE, HOUR or DAY");
    if (req.start === null) throw new InvalidArgumentError("start_time", "is required");
    const g = req.granularity;
    const size = BUCKET_MS[g];
    const t = now();
    const start = req.start - (((req.start % size) + size) % size);
    const rawEnd = req.end ?? t;
    const end = Math.ceil(rawEnd / size) * size;
    if (end <= start) throw new InvalidArgumentError("end_time", "must be after start_time");
    // Checked on the requested range; rounding out to whole buckets adds at most one.
    if (rawEnd - req.start > MAX_RANGE_MS[g]) {
      throw new InvalidArgumentError("start_time", `the range is longer than ${RANGE_TEXT[g]}, the most answered at ${g.toUpperCase()} granularity`);
    }
    if (g === "minute" && start < t - deps.minuteRetentionMs) {
      throw new InvalidArgumentError("start_time", `minute buckets are kept for ${Math.round(deps.minuteRetentionMs / 3_600_000)} hours; use HOUR or DAY for older ranges`);
    }
    if (g === "hour" && deps.hourRetentionMs !== undefined && start < t - deps.hourRetentionMs) {
      throw new InvalidArgumentError("start_time", `hour buckets are kept for ${Math.round(deps.hourRetentionMs / 86_400_000)} days; use DAY for older ranges`);
    }
    if (g === "day" && deps.dayRetentionMs && start < t - deps.dayRetentionMs - BUCKET_MS.day) {
      throw new InvalidArgumentError("start_time", `day buckets are kept for ${Math.round(deps.dayRetentionMs / 86_400_000)} days`);
    }
    return { start, end, granularity: g };
  }

  function seriesOf(groups: Map<string, UsageRow[]>, start: number, end: number, g: Granularity): UsageSeries[] {
    const size = BUCKET_MS[g];
    const out: UsageSeries[] = [];
    for (const [group, rows] of groups) {
      const byBucket = new Map<number, Counts>();
      const totals = emptyCounts();
      for (const r of rows) {
        let c = byBucket.get(r.bucket);
        if (!c) byBucket.set(r.bucket, (c = emptyCounts()));
        addCounts(c, r.counts);
        addCounts(totals, r.counts);
      }
      const points = [];
      for (let t = start; t < end; t += size) points.push({ time: t, counts: byBucket.get(t) ?? emptyCounts() });
      out.push({ group, totals, points });
    }
    return out.sort((a, b) => (a.group < b.group ? -1 : a.group > b.group ? 1 : 0));
  }

  function group(rows: UsageRow[], by: (r: UsageRow) => string): Map<string, UsageRow[]> {
    const m = groupBy(rows, by);
    if (m.size > MAX_SERIES) throw new InvalidArgumentError("group_by", `the range has ${m.size} groups; at most ${MAX_SERIES} are answered`);
    return m;
  }

  async function report(by: { identityId: string } | { keyId: string }, req: UsageRequest): Promise<UsageReport> {
    const { start, end, granularity } = range(req);
    const base = { by, granularity, start, end, maxRows: MAX_ROWS };
    const rows = await store.queryUsage({ ...base, tagged: false });
    const totals = emptyCounts();
    for (const r of rows) addCounts(totals, r.counts);
    let series: UsageSeries[];
    switch (req.groupBy) {
      case "key":
        series = seriesOf(group(rows, (r) => r.keyId), start, end, granularity);
        break;
      case "tag":
        series = seriesOf(group(await store.queryUsage({ ...base, tagged: true }), (r) => r.tag), start, end, granularity);
        break;
      case "outcome": {
        const all = seriesOf(new Map([["", rows]]), start, end, granularity)[0];
        // One series per outcome: its count as `total` and in its own field.
        const pick = (c: Counts, f: CounterName): Counts => ({
          ...emptyCounts(),
          total: c[f],
          [f]: c[f],
          creditsSpent: f === "valid" ? c.creditsSpent : 0,
        });
        series = OUTCOMES.map(([name, f]) => ({
          group: name,
          totals: pick(all.totals, f),
          points: all.points.map((p) => ({ time: p.time, counts: pick(p.counts, f) })),
        }));
        break;
      }
      default:
        series = seriesOf(new Map([["", rows]]), start, end, granularity);
    }
    return { start, end, totals, series };
  }

  return {
    async identityUsage(principal: Principal, lookup: IdentityLookup, req: UsageRequest): Promise<UsageReport> {
      principal.require("usage", null);
      let identityId: string;
      if ("id" in lookup) {
        // A deleted identity's usage stays readable by id.
        identityId = checkId("id", lookup.id, ID_PATTERNS.identity);
      } else {
        const rec = await store.getIdentityByExternalId(checkExternalId("external_id", lookup.externalId));
        if (!rec) throw new NotFoundError("identity not found");
        identityId = rec.id;
      }
      return report({ identityId }, req);
    },

    async keyUsage(principal: Principal, keyId: string, req: UsageRequest): Promise<UsageReport> {
      checkId("id", keyId, ID_PATTERNS.key);
      if (!principal.hasAny("usage")) principal.require("usage", null);
      const key = await store.getKey(keyId);
      // A deleted key's usage stays readable, with a global usage permission.
      if (key ? !principal.can("usage", key.apiId) : !principal.can("usage", null)) throw new NotFoundError("key not found");
      return report({ keyId }, { ...req, groupBy: req.groupBy === "key" ? "none" : req.groupBy });
    },
  };
}

export type UsageReader = ReturnType<typeof createUsageReader>;
