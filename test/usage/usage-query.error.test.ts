/**
 * GetIdentityUsage and GetKeyUsage refuse bad requests with INVALID_ARGUMENT
 * naming the field: missing granularity or start_time, end before start,
 * ranges longer than answered (MINUTE 24 hours, HOUR 31 days, DAY 400 days),
 * MINUTE ranges older than the minute retention, malformed ids and
 * timestamps; unknown identities by external id are NOT_FOUND. The longest
 * allowed ranges are answered.
 */
import { Code } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { Granularity } from "../../gen/latchkey/v1/usage_pb.js";
import type { Clients } from "../support/harness.js";
import { rpcError, unique } from "../support/harness.js";
import { DAY, HOUR, rawUsageFields, useUsageHarness, type UsageParams } from "./support.js";

type Call = (c: Clients, p: UsageParams) => Promise<unknown>;

describe("usage query errors", () => {
  const h = useUsageHarness("embedded");
  let identityId = "";
  let keyId = "";

  const rpcs: [string, Call][] = [
    ["GetIdentityUsage", (c, p) => c.identities.getIdentityUsage({ lookup: { case: "id", value: identityId }, ...rawUsageFields(p) })],
    ["GetKeyUsage", (c, p) => c.keys.getKeyUsage({ id: keyId, ...rawUsageFields(p) })],
  ];

  async function arrange(): Promise<Clients> {
    const c = h().admin;
    const { identity } = await c.identities.createIdentity({ externalId: unique("org") });
    identityId = identity!.id;
    keyId = (await c.keys.createKey({ apiId: "api_usage", identity: { case: "identityId", value: identityId } })).key!.id;
    return c;
  }

  async function expectInvalid(call: Promise<unknown>, field: string): Promise<void> {
    const err = await rpcError(call);
    expect(Code[err.code]).toBe("InvalidArgument");
    expect(err.rawMessage, err.rawMessage).toMatch(new RegExp(`^${field.replace(/[[\]]/g, "\\$&")}: `));
  }

  describe.each(rpcs)("%s", (_name, call) => {
    it("requires granularity", async () => {
      const c = await arrange();
      await expectInvalid(call(c, { start: Date.now() - HOUR }), "granularity");
    });

    it("requires start_time", async () => {
      const c = await arrange();
      await expectInvalid(call(c, { granularity: "HOUR" }), "start_time");
    });

    it("refuses an end_time before or at start_time", async () => {
      const c = await arrange();
      const t = Date.now() - 5 * HOUR;
      await expectInvalid(call(c, { granularity: "HOUR", start: t, end: t - HOUR }), "end_time");
      const hour = t - (t % HOUR);
      await expectInvalid(call(c, { granularity: "HOUR", start: hour, end: hour }), "end_time");
      // A start in the future ends (by default, now) before it starts.
      await expectInvalid(call(c, { granularity: "MINUTE", start: Date.now() + HOUR }), "end_time");
    });

    it.each([
      ["MINUTE", DAY],
      ["HOUR", 31 * DAY],
      ["DAY", 400 * DAY],
    ] as const)("answers a %s range of the longest length and refuses a longer one, naming start_time", async (granularity, longest) => {
      const c = await arrange();
      const end = Date.now();
      await expect(call(c, { granularity, start: end - longest, end })).resolves.toBeDefined();
      await expectInvalid(call(c, { granularity, start: end - longest - 60_000, end }), "start_time");
      // Also when the end is in the future.
      await expectInvalid(call(c, { granularity, start: end - 60_000, end: end + longest }), "start_time");
    });

    it("refuses a MINUTE range older than the minute retention (48 hours), naming start_time", async () => {
      const c = await arrange();
      const start = Date.now() - 50 * HOUR;
      await expectInvalid(call(c, { granularity: "MINUTE", start, end: start + HOUR }), "start_time");
      // The same range by hour is answered.
      await expect(call(c, { granularity: "HOUR", start, end: start + HOUR })).resolves.toBeDefined();
    });

    it("refuses an HOUR range older than the hour retention (90 days), naming start_time", async () => {
      const c = await arrange();
      const start = Date.now() - 95 * 24 * HOUR;
      await expectInvalid(call(c, { granularity: "HOUR", start, end: start + HOUR }), "start_time");
      // The same range by day is answered.
      await expect(call(c, { granularity: "DAY", start, end: start + 24 * HOUR })).resolves.toBeDefined();
    });

    it("refuses malformed timestamps, naming the field", async () => {
      const c = await arrange();
      const fields = rawUsageFields({ granularity: "HOUR", start: Date.now() - HOUR });
      const bad = { seconds: 1n, nanos: -1 };
      const send = (extra: object) =>
        _name === "GetIdentityUsage"
          ? c.identities.getIdentityUsage({ lookup: { case: "id", value: identityId }, ...fields, ...extra })
          : c.keys.getKeyUsage({ id: keyId, ...fields, ...extra });
      await expectInvalid(send({ startTime: bad }), "start_time");
      await expectInvalid(send({ endTime: { seconds: 253402300800n, nanos: 0 } }), "end_time");
    });

    it("refuses an unknown granularity value", async () => {
      const c = await arrange();
      const fields = { ...rawUsageFields({ start: Date.now() - HOUR }), granularity: 42 as Granularity };
      const res =
        _name === "GetIdentityUsage"
          ? c.identities.getIdentityUsage({ lookup: { case: "id", value: identityId }, ...fields })
          : c.keys.getKeyUsage({ id: keyId, ...fields });
      await expectInvalid(res, "granularity");
    });
  });

  it("GetIdentityUsage needs id or external_id, each well-formed", async () => {
    const c = await arrange();
    const fields = rawUsageFields({ granularity: "HOUR", start: Date.now() - HOUR });
    await expectInvalid(c.identities.getIdentityUsage({ ...fields }), "id");
    await expectInvalid(c.identities.getIdentityUsage({ lookup: { case: "id", value: "key_nope" }, ...fields }), "id");
    await expectInvalid(c.identities.getIdentityUsage({ lookup: { case: "externalId", value: "has space" }, ...fields }), "external_id");
  });

  it("GetIdentityUsage of an unknown external_id is NOT_FOUND", async () => {
    const c = await arrange();
    const err = await rpcError(c.identities.getIdentityUsage({ lookup: { case: "externalId", value: unique("nobody") }, ...rawUsageFields({ granularity: "HOUR", start: Date.now() - HOUR }) }));
    expect(Code[err.code]).toBe("NotFound");
  });

  it("GetKeyUsage needs a well-formed key id", async () => {
    const c = await arrange();
    const fields = rawUsageFields({ granularity: "HOUR", start: Date.now() - HOUR });
    await expectInvalid(c.keys.getKeyUsage({ id: "", ...fields }), "id");
    await expectInvalid(c.keys.getKeyUsage({ id: identityId, ...fields }), "id");
    await expectInvalid(c.keys.getKeyUsage({ id: "key_$gt", ...fields }), "id");
  });
});
