// One started production install, checked from outside with Node's built-ins only
// (no package of the checkout or of the install under test):
//   node prod-install-check.mjs PORT ROOT_KEY [REDIS_URL_EXPECTED_TO_HOLD_THE_COUNTS]
// 1. gRPC health Check over HTTP/2 until SERVING (at most 30 s);
// 2. CreateKey over Connect JSON (HTTP/1.1) with an auto-applied rate limit;
// 3. VerifyKey over native gRPC (HTTP/2): valid, with the limit counted once;
// 4. with a Redis URL: the limit's window counter is in that Redis.
// Exits non-zero with a message on the first failure.
import http2 from "node:http2";
import net from "node:net";

const [port, rootKey, redisUrl] = process.argv.slice(2);
if (!port || !rootKey) throw new Error("usage: prod-install-check.mjs PORT ROOT_KEY [REDIS_URL]");
const origin = `http://127.0.0.1:${port}`;

function fail(msg) {
  process.stderr.write(`prod-install-check: ${msg}\n`);
  process.exit(1);
}

// --- a minimal protobuf writer/reader, enough for the three messages used here
function varint(n) {
  const out = [];
  while (n > 127) {
    out.push((n & 127) | 128);
    n >>>= 7;
  }
  out.push(n);
  return Buffer.from(out);
}
function stringField(no, s) {
  const b = Buffer.from(s, "utf8");
  return Buffer.concat([varint((no << 3) | 2), varint(b.length), b]);
}
/** Top-level fields of a message: number → list of (varint number | Buffer). */
function fields(buf) {
  const out = new Map();
  let i = 0;
  const readVarint = () => {
    let n = 0;
    let shift = 0;
    for (;;) {
      const b = buf[i++];
      n += (b & 127) * 2 ** shift;
      if (b < 128) return n;
      shift += 7;
    }
  };
  while (i < buf.length) {
    const tag = readVarint();
    const no = tag >>> 3;
    let v;
    switch (tag & 7) {
      case 0:
        v = readVarint();
        break;
      case 2: {
        const len = readVarint();
        v = buf.subarray(i, i + len);
        i += len;
        break;
      }
      case 1:
        v = buf.subarray(i, (i += 8));
        break;
      case 5:
        v = buf.subarray(i, (i += 4));
        break;
      default:
        throw new Error(`unexpected wire type in response`);
    }
    out.set(no, [...(out.get(no) ?? []), v]);
  }
  return out;
}

/** One unary gRPC call; resolves with the response message bytes or rejects with the status. */
function grpcUnary(path, message, authorization) {
  return new Promise((resolve, reject) => {
    const session = http2.connect(origin);
    session.on("error", reject);
    const headers = { ":method": "POST", ":path": path, "content-type": "application/grpc", te: "trailers" };
    if (authorization) headers.authorization = authorization;
    const stream = session.request(headers);
    const chunks = [];
    let status = null;
    let grpcMessage = "";
    const readStatus = (h) => {
      if (h["grpc-status"] !== undefined) {
        status = Number(h["grpc-status"]);
        grpcMessage = decodeURIComponent(h["grpc-message"] ?? "");
      }
    };
    stream.on("response", readStatus);
    stream.on("trailers", readStatus);
    stream.on("data", (c) => chunks.push(c));
    stream.on("error", (err) => {
      session.close();
      reject(err);
    });
    stream.on("end", () => {
      session.close();
      if (status !== 0) return reject(new Error(`${path}: grpc-status ${status} ${grpcMessage}`));
      const body = Buffer.concat(chunks);
      if (body.length < 5 || body.readUInt32BE(1) !== body.length - 5) return reject(new Error(`${path}: malformed response`));
      resolve(body.subarray(5));
    });
    const frame = Buffer.alloc(5 + message.length);
    frame.writeUInt32BE(message.length, 1);
    message.copy(frame, 5);
    stream.end(frame);
  });
}

async function waitServing() {
  const deadline = Date.now() + 30_000;
  let last = "no answer";
  while (Date.now() < deadline) {
    try {
      const res = fields(await grpcUnary("/grpc.health.v1.Health/Check", Buffer.alloc(0)));
      if (res.get(1)?.[0] === 1) return;
      last = `status ${res.get(1)?.[0] ?? 0}`;
    } catch (err) {
      last = err.message;
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  fail(`health never reported SERVING (last: ${last})`);
}

/** KEYS over RESP, without a client library. */
function redisKeys(url, pattern) {
  const u = new URL(url);
  return new Promise((resolve, reject) => {
    const sock = net.connect(Number(u.port || 6379), u.hostname);
    const cmd = ["KEYS", pattern];
    sock.end(`*${cmd.length}\r\n${cmd.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join("")}`);
    let data = "";
    sock.setEncoding("utf8").on("data", (d) => (data += d));
    sock.on("error", reject);
    sock.on("close", () => {
      if (!data.startsWith("*")) return reject(new Error(`redis answered ${JSON.stringify(data.slice(0, 200))}`));
      resolve(data.split("\r\n").filter((l, i) => i > 0 && !l.startsWith("$") && l !== ""));
    });
  });
}

await waitServing();

const created = await fetch(`${origin}/latchkey.v1.KeyService/CreateKey`, {
  method: "POST",
  headers: { "content-type": "application/json", authorization: `Bearer ${rootKey}` },
  body: JSON.stringify({
    api_id: "api_prod_install",
    name: "prod-install",
    ratelimits: [{ name: "requests", limit: "10", duration: "60s", auto_apply: true }],
  }),
});
const createdBody = await created.text();
if (created.status !== 200) fail(`CreateKey over Connect JSON: HTTP ${created.status} ${createdBody}`);
const { plaintext, key } = JSON.parse(createdBody);
if (!plaintext || !key?.id) fail(`CreateKey returned no key: ${createdBody}`);

let verified;
try {
  verified = fields(
    await grpcUnary(
      "/latchkey.v1.KeyService/VerifyKey",
      Buffer.concat([stringField(1, plaintext), stringField(2, "api_prod_install")]),
      `Bearer ${rootKey}`,
    ),
  );
} catch (err) {
  fail(`VerifyKey over gRPC: ${err.message}`);
}
if (verified.get(1)?.[0] !== 1) fail(`VerifyKey: the new key is not valid (code ${verified.get(2)?.[0]})`);
const limit = fields(verified.get(11)?.[0] ?? Buffer.alloc(0));
if (limit.get(3)?.[0] !== 9) fail(`VerifyKey: the auto-applied limit was not counted once (remaining ${limit.get(3)?.[0]})`);

if (redisUrl) {
  const counters = await redisKeys(redisUrl, `*${key.id}*`);
  if (counters.length === 0) fail(`the rate-limit window of ${key.id} is not in Redis: the redis backend was not used`);
}
process.stdout.write(`healthy; created ${key.id}; VerifyKey VALID, limit counted${redisUrl ? " in Redis" : ""}\n`);
