/**
 * Deadlines and cancellation on the lean gRPC path (issue 9, item 3): a call
 * ends with DEADLINE_EXCEEDED when its grpc-timeout passes — at that moment,
 * even while its handler still runs — and ctx.signal tells the handler; a
 * deadline already passed when the request is complete never runs the
 * handler. Driven with node:http2, grpc-js and the Python grpcio client against
 * the gated fixture (Latchkey's own createServer).
 */
import { toBinary, create } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import path from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { VerifyKeyRequestSchema } from "../../gen/latchkey/v1/key_service_pb.js";
import { REPO, findPython, itWithTool, run } from "../integration/support.js";
import { connect, eventually, grpcCall, grpcStream, message, outcome, startFixture, type Fixture } from "./support.js";

const VERIFY = "/latchkey.v1.KeyService/VerifyKey";
const AUTH = { authorization: "Bearer good" };
const verify = (key: string) => message(VerifyKeyRequestSchema, { key });
const python = findPython();

describe("deadlines on the lean gRPC path", () => {
  let fx: Fixture;
  let n = 0;
  const id = () => `d${++n}`;
  beforeAll(async () => {
    fx = await startFixture();
    // One call first: a cold process under load can spend the first test's 300 ms before its handler starts.
    const warm = id();
    fx.release(warm);
    expect((await grpcCall(fx.port, VERIFY, verify(`gate:${warm}`), AUTH)).status).toBe("0");
  });

  /** Proves a handler never ran: a later call's "entered" is seen, and the earlier one's is not. */
  async function neverEntered(ids: string[]) {
    const sentinel = id();
    fx.release(sentinel);
    const o = await grpcCall(fx.port, VERIFY, verify(`gate:${sentinel}`), AUTH);
    expect(o.status).toBe("0");
    await fx.waitFor((e) => e.event === "entered" && e.id === sentinel, "sentinel entered");
    for (const x of ids) expect(fx.events.filter((e) => e.id === x)).toEqual([]);
  }

  it("answers DEADLINE_EXCEEDED when grpc-timeout passes while the handler is held, and ctx.signal aborts with DEADLINE_EXCEEDED", async () => {
    const call = id();
    const c = connect(fx.port);
    const s = grpcStream(c, VERIFY, { ...AUTH, "grpc-timeout": "300m" });
    const o = outcome(s);
    s.end(verify(`gate:${call}`));
    const entered = await fx.waitFor((e) => e.event === "entered" && e.id === call, "entered");
    expect(entered.timeoutMs).toBeGreaterThan(0);
    expect(entered.timeoutMs).toBeLessThanOrEqual(300);
    // Still held: the answer does not wait for the handler.
    const r = await o;
    expect(r.status).toBe("4");
    expect(r.data.length).toBe(0);
    expect((await fx.waitFor((e) => e.event === "aborted" && e.id === call, "aborted")).code).toBe("DeadlineExceeded");
    fx.release(call);
    expect((await fx.waitFor((e) => e.event === "finished" && e.id === call, "finished")).aborted).toBe(true);
    c.close();
    await fx.assertAlive();
  });

  it("a deadline longer than a second (watched by the shared timer) ends a held call the same way", async () => {
    const call = id();
    const o = grpcCall(fx.port, VERIFY, verify(`gate:${call}`), { ...AUTH, "grpc-timeout": "1100m" });
    await fx.waitFor((e) => e.event === "entered" && e.id === call, "entered");
    expect((await o).status).toBe("4");
    expect((await fx.waitFor((e) => e.event === "aborted" && e.id === call, "aborted")).code).toBe("DeadlineExceeded");
    fx.release(call);
    await fx.waitFor((e) => e.event === "finished" && e.id === call, "finished");
  });

  it("never runs the handler when the deadline has passed on arrival (grpc-timeout: 1n, a client that does not cancel)", async () => {
    const ids = [id(), id(), id()];
    for (const x of ids) {
      const o = await grpcCall(fx.port, VERIFY, verify(`gate:${x}`), { ...AUTH, "grpc-timeout": "1n" });
      expect(o.status).toBe("4");
    }
    await neverEntered(ids);
  });

  it("understands every grpc-timeout unit", async () => {
    const cases: [string, number][] = [
      ["1H", 3_600_000],
      ["2M", 120_000],
      ["3S", 3000],
      ["4000m", 4000],
      ["5000000u", 5000],
      ["99999999n", 100],
    ];
    for (const [header, ms] of cases) {
      const call = id();
      fx.release(call);
      const o = await grpcCall(fx.port, VERIFY, verify(`gate:${call}`), { ...AUTH, "grpc-timeout": header });
      const entered = await fx.waitFor((e) => e.event === "entered" && e.id === call, "entered");
      expect(entered.timeoutMs, header).toBeGreaterThan(0);
      expect(entered.timeoutMs, header).toBeLessThanOrEqual(ms);
      expect(o.status, header).toBe("0");
    }
  });

  it("answers an invalid grpc-timeout INVALID_ARGUMENT without running the handler", async () => {
    const ids = [id(), id()];
    for (const [x, header] of [
      [ids[0], "1x"],
      [ids[1], "123456789S"],
    ]) {
      const o = await grpcCall(fx.port, VERIFY, verify(`gate:${x}`), { ...AUTH, "grpc-timeout": header });
      expect(o.status, header).toBe("3");
    }
    await neverEntered(ids);
  });

  it("grpc-js: a deadline that passes while the handler is held ends the call with DEADLINE_EXCEEDED", async () => {
    const call = id();
    const client = new grpc.Client(`127.0.0.1:${fx.port}`, grpc.credentials.createInsecure());
    const md = new grpc.Metadata();
    md.set("authorization", "Bearer good");
    const bytes = Buffer.from(toBinary(VerifyKeyRequestSchema, create(VerifyKeyRequestSchema, { key: `gate:${call}` })));
    const err = await new Promise<grpc.ServiceError | null>((resolve) =>
      client.makeUnaryRequest(
        VERIFY,
        (b: Buffer) => b,
        (b: Buffer) => b,
        bytes,
        md,
        { deadline: Date.now() + 300 },
        (e) => resolve(e),
      ),
    );
    expect(err?.code).toBe(grpc.status.DEADLINE_EXCEEDED);
    const aborted = await fx.waitFor((e) => e.event === "aborted" && e.id === call, "aborted");
    // The server's timer or the client's RST_STREAM at its own deadline, whichever came first.
    expect(["DeadlineExceeded", "Canceled"]).toContain(aborted.code);
    fx.release(call);
    await fx.waitFor((e) => e.event === "finished" && e.id === call, "finished");
    client.close();
  });

  itWithTool(python, "python3 with grpcio", "Python grpcio with a 0.5 ms deadline: every call DEADLINE_EXCEEDED, every handler that started sees its signal abort", async (py) => {
    const ids = Array.from({ length: 20 }, () => id());
    const hex = ids.map((x) => Buffer.from(toBinary(VerifyKeyRequestSchema, create(VerifyKeyRequestSchema, { key: `gate:${x}` }))).toString("hex"));
    const res = await run(
      py,
      [path.join(REPO, "test/python/deadline_client.py"), "--address", `127.0.0.1:${fx.port}`, "--method", VERIFY, "--timeout", "0.0005", "--authorization", "Bearer good", ...hex],
      { timeoutMs: 60_000 },
    );
    expect(res.code, res.stderr).toBe(0);
    expect(JSON.parse(res.stdout)).toEqual(ids.map(() => "DEADLINE_EXCEEDED"));
    const entered = ids.filter((x) => fx.events.some((e) => e.event === "entered" && e.id === x));
    for (const x of entered) await fx.waitFor((e) => e.event === "aborted" && e.id === x, `aborted ${x}`);
    for (const x of ids) fx.release(x);
    for (const x of entered) expect((await fx.waitFor((e) => e.event === "finished" && e.id === x, `finished ${x}`)).aborted).toBe(true);
    await eventually(async () => {
      await fx.assertAlive();
      return true;
    }, "alive");
  });
});
