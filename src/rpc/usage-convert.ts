import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Granularity, UsageGroupBy } from "../../gen/latchkey/v1/usage_pb.js";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import type { GroupBy, UsageReport, UsageRequest } from "../domain/usage-reader.js";
import { COUNTERS, type Counts } from "../domain/usage.js";
import { toMs } from "./convert.js";

/** Usage request and report ⇄ protobuf, shared by GetIdentityUsage and GetKeyUsage. */
export function usageRequestOf(req: { startTime?: Timestamp; endTime?: Timestamp; granularity: Granularity; groupBy: UsageGroupBy }): UsageRequest {
  const granularity =
    req.granularity === Granularity.MINUTE ? "minute" : req.granularity === Granularity.HOUR ? "hour" : req.granularity === Granularity.DAY ? "day" : null;
  const groupBy: GroupBy =
    req.groupBy === UsageGroupBy.KEY ? "key" : req.groupBy === UsageGroupBy.OUTCOME ? "outcome" : req.groupBy === UsageGroupBy.TAG ? "tag" : "none";
  return { start: toMs("start_time", req.startTime), end: toMs("end_time", req.endTime), granularity, groupBy };
}

function countsToProto(c: Counts) {
  const out: Record<string, bigint> = {};
  for (const k of COUNTERS) out[k] = BigInt(c[k]);
  return out;
}

export function usageReportToProto(r: UsageReport) {
  return {
    totals: countsToProto(r.totals),
    series: r.series.map((s) => ({
      group: s.group,
      totals: countsToProto(s.totals),
      points: s.points.map((p) => ({ time: timestampFromMs(p.time), counts: countsToProto(p.counts) })),
    })),
    startTime: timestampFromMs(r.start),
    endTime: timestampFromMs(r.end),
  };
}
