import type { JsonObject, JsonValue, MessageInitShape } from "@bufbuild/protobuf";
import { BinaryWriter, WireType } from "@bufbuild/protobuf/wire";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import type { VerifyKeyResponseSchema } from "../../gen/latchkey/v1/key_service_pb.js";

/*
 * A hand-written protobuf encoder for VerifyKeyResponse, the one message on the
 * hot path. protobuf-es encodes by reflection, which profiled at about a third
 * of a verification's CPU, most of it turning `meta` objects into
 * google.protobuf.Struct. This writes the same wire format directly, and
 * remembers each meta object's encoding (meta objects come from the
 * verification cache and are shared by every call for the same key), so
 * steady-state verifications never re-encode meta. The output decodes to the
 * same message as `toBinary` (test/rpc/verify-response-encoder.test.ts).
 */

type Init = MessageInitShape<typeof VerifyKeyResponseSchema>;
const LD = WireType.LengthDelimited;

const structCache = new WeakMap<object, Uint8Array>();

function writeValue(w: BinaryWriter, v: JsonValue): void {
  if (v === null) w.tag(1, WireType.Varint).int32(0);
  else if (typeof v === "number") w.tag(2, WireType.Bit64).double(v);
  else if (typeof v === "string") w.tag(3, LD).string(v);
  else if (typeof v === "boolean") w.tag(4, WireType.Varint).bool(v);
  else if (Array.isArray(v)) {
    w.tag(6, LD).fork();
    for (const x of v) {
      w.tag(1, LD).fork();
      writeValue(w, x);
      w.join();
    }
    w.join();
  } else {
    w.tag(5, LD).fork();
    writeStructFields(w, v);
    w.join();
  }
}

function writeStructFields(w: BinaryWriter, obj: JsonObject): void {
  for (const k in obj) {
    const v = obj[k];
    if (v === undefined) continue;
    w.tag(1, LD).fork().tag(1, LD).string(k).tag(2, LD).fork();
    writeValue(w, v);
    w.join().join();
  }
}

/** The encoded body of a Struct for `obj`, memoised per object. */
function structBytes(obj: JsonObject): Uint8Array {
  let b = structCache.get(obj);
  if (!b) {
    const w = new BinaryWriter();
    writeStructFields(w, obj);
    b = w.finish();
    structCache.set(obj, b);
  }
  return b;
}

/*
 * The response itself is written by hand into one scratch buffer: protobuf-es's
 * BinaryWriter turns every string into a new Uint8Array through TextEncoder
 * (keyId, name, apiId, identity ids, limit names — the largest item of the
 * encoder in the profile) and every sub-message into a chunk list. Strings of
 * ASCII are copied byte for byte; others go through encodeInto. Encoding is
 * synchronous, so one buffer serves every call; the result is a copy.
 */
let buf = Buffer.alloc(4096);
let pos = 0;
const textEncoder = new TextEncoder();

function ensure(n: number): void {
  if (pos + n <= buf.length) return;
  const bigger = Buffer.alloc(Math.max(buf.length * 2, pos + n));
  buf.copy(bigger, 0, 0, pos);
  buf = bigger;
}

/** A varint of a whole number in [0, 2^53). */
function varint(v: number): void {
  ensure(10);
  while (v > 127) {
    buf[pos++] = (v % 128) | 128;
    v = Math.floor(v / 128);
  }
  buf[pos++] = v;
}

/** An int64 varint: negative values as their 64-bit two's complement (10 bytes). */
function varint64(v: bigint | number | string): void {
  if (typeof v === "number" && v >= 0 && Number.isSafeInteger(v)) return varint(v);
  let b = BigInt.asUintN(64, BigInt(v));
  ensure(10);
  while (b > 127n) {
    buf[pos++] = Number(b & 127n) | 128;
    b >>= 7n;
  }
  buf[pos++] = Number(b);
}

function int64(v: bigint | number | string): void {
  if (typeof v === "bigint" && v >= 0n && v <= 9007199254740991n) varint(Number(v));
  else varint64(v);
}

function tag(field: number, wireType: number): void {
  varint((field << 3) | wireType);
}

function string(field: number, s: string): void {
  tag(field, LD);
  const n = s.length;
  let ascii = true;
  for (let i = 0; i < n; i++) {
    if (s.charCodeAt(i) > 127) {
      ascii = false;
      break;
    }
  }
  if (ascii) {
    varint(n);
    ensure(n);
    for (let i = 0; i < n; i++) buf[pos++] = s.charCodeAt(i);
    return;
  }
  const len = Buffer.byteLength(s, "utf8");
  varint(len);
  ensure(len);
  textEncoder.encodeInto(s, buf.subarray(pos, pos + len));
  pos += len;
}

function str(field: number, s: string | undefined): void {
  if (s) string(field, s);
}

function bytes(field: number, b: Uint8Array): void {
  tag(field, LD);
  varint(b.length);
  ensure(b.length);
  buf.set(b, pos);
  pos += b.length;
}

/** Starts a sub-message of `field`: one byte is kept for its length, which `join` writes. */
function fork(field: number): number {
  tag(field, LD);
  ensure(1);
  return pos++;
}

function join(at: number): void {
  const len = pos - at - 1;
  if (len < 128) {
    buf[at] = len;
    return;
  }
  // A longer length takes more bytes: move the body up to make room.
  let extra = 0;
  for (let v = len >>> 7; v > 0; v >>>= 7) extra++;
  ensure(extra);
  buf.copyWithin(at + 1 + extra, at + 1, pos);
  pos += extra;
  let v = len;
  let i = at;
  while (v > 127) {
    buf[i++] = (v & 127) | 128;
    v >>>= 7;
  }
  buf[i] = v;
}

function writeStruct(field: number, obj: JsonObject | undefined): void {
  if (obj === undefined) return;
  bytes(field, structBytes(obj));
}

function writeTimestamp(field: number, t: Timestamp | undefined): void {
  if (!t) return;
  const at = fork(field);
  if (t.seconds !== 0n) {
    tag(1, WireType.Varint);
    int64(t.seconds);
  }
  if (t.nanos !== 0) {
    tag(2, WireType.Varint);
    varint64(t.nanos);
  }
  join(at);
}

/*
 * Most of a response is the same call after call for one key: its id, name,
 * meta, expiry, enabled flag, permissions, identity and api id. Those fields are
 * encoded once per key and kept (by key id, at most FIXED_MAX keys, the oldest
 * dropped first) with the values they were encoded from; a response whose values
 * are not the same (a key changed, an identity attached) is encoded again. Only
 * valid, code, the credits balance and the rate limits are written per call.
 * Values compare by ===, element by element for permissions and by object for
 * meta (as structCache does: meta objects are replaced, never changed in place).
 */
interface Fixed {
  name: string | undefined;
  apiId: string | undefined;
  meta: unknown;
  expiresAt: Timestamp | undefined;
  enabled: boolean | undefined;
  permissions: string[];
  identity: { id?: string; externalId?: string; meta?: unknown } | undefined;
  /** Fields 3–7, then 9–10 from `a`, then 12 from `b`. */
  bytes: Buffer;
  a: number;
  b: number;
}
const FIXED_MAX = 20_000;
const fixedByKey = new Map<string, Fixed>();

function sameFixed(f: Fixed, m: Init): boolean {
  if (f.name !== m.name || f.apiId !== m.apiId || f.meta !== m.meta || f.enabled !== m.enabled) return false;
  const t = m.expiresAt as Timestamp | undefined;
  if (t === undefined ? f.expiresAt !== undefined : f.expiresAt === undefined || f.expiresAt.seconds !== t.seconds || f.expiresAt.nanos !== t.nanos) return false;
  const p = m.permissions ?? [];
  if (p.length !== f.permissions.length) return false;
  for (let i = 0; i < p.length; i++) if (p[i] !== f.permissions[i]) return false;
  const id = m.identity;
  if (id === undefined || f.identity === undefined) return id === f.identity;
  return id.id === f.identity.id && id.externalId === f.identity.externalId && id.meta === f.identity.meta;
}

/** The fixed fields of `m` encoded (from the scratch buffer's start: call before writing the response). */
function fixedOf(keyId: string, m: Init): Fixed {
  const known = fixedByKey.get(keyId);
  if (known && sameFixed(known, m)) return known;
  pos = 0;
  writeFieldsTo7(m);
  const a = pos;
  writeFields9And10(m);
  const b = pos;
  str(12, m.apiId);
  const bytes = Buffer.from(buf.subarray(0, pos));
  const t = m.expiresAt as Timestamp | undefined;
  const id = m.identity;
  const f: Fixed = {
    name: m.name,
    apiId: m.apiId,
    meta: m.meta,
    expiresAt: t && ({ seconds: t.seconds, nanos: t.nanos } as Timestamp),
    enabled: m.enabled,
    permissions: [...(m.permissions ?? [])],
    identity: id && { id: id.id, externalId: id.externalId, meta: id.meta },
    bytes,
    a,
    b,
  };
  if (known) fixedByKey.delete(keyId);
  else if (fixedByKey.size >= FIXED_MAX) fixedByKey.delete(fixedByKey.keys().next().value!);
  fixedByKey.set(keyId, f);
  return f;
}

/** Fields 3–7: key id, name, meta, expiry, enabled. */
function writeFieldsTo7(m: Init): void {
  str(3, m.keyId);
  str(4, m.name);
  writeStruct(5, m.meta as JsonObject | undefined);
  writeTimestamp(6, m.expiresAt as Timestamp | undefined);
  if (m.enabled) tag(7, WireType.Varint), varint(1);
}

/** Fields 9 and 10: permissions, identity. */
function writeFields9And10(m: Init): void {
  for (const p of m.permissions ?? []) string(9, p);
  const id = m.identity;
  if (id) {
    const at = fork(10);
    str(1, id.id);
    str(2, id.externalId);
    writeStruct(3, id.meta as JsonObject | undefined);
    join(at);
  }
}

function segment(b: Buffer, from: number, to: number): void {
  const n = to - from;
  ensure(n);
  b.copy(buf, pos, from, to);
  pos += n;
}

/** The message's bytes, after `reserve` bytes left for the caller (the lean path writes its gRPC frame prefix there). */
export function encodeVerifyKeyResponse(m: Init, reserve = 0): Uint8Array {
  const fixed = m.keyId ? fixedOf(m.keyId, m) : null;
  pos = reserve;
  if (m.valid) varint(8 /* field 1, varint */), varint(1);
  if (m.code) {
    tag(2, WireType.Varint);
    varint64(m.code);
  }
  if (fixed) segment(fixed.bytes, 0, fixed.a);
  else writeFieldsTo7(m);
  if (m.creditsRemaining !== undefined) {
    tag(8, WireType.Varint);
    int64(m.creditsRemaining);
  }
  if (fixed) segment(fixed.bytes, fixed.a, fixed.b);
  else writeFields9And10(m);
  for (const r of m.ratelimits ?? []) {
    const at = fork(11);
    str(1, r.name);
    if (r.limit) {
      tag(2, WireType.Varint);
      int64(r.limit);
    }
    if (r.remaining) {
      tag(3, WireType.Varint);
      int64(r.remaining);
    }
    writeTimestamp(4, r.resetAt as Timestamp | undefined);
    if (r.exceeded) tag(5, WireType.Varint), varint(1);
    join(at);
  }
  if (fixed) segment(fixed.bytes, fixed.b, fixed.bytes.length);
  else str(12, m.apiId);
  // A copy from Node's buffer pool (a typed array's slice allocates an ArrayBuffer of its own).
  const out = Buffer.allocUnsafe(pos);
  buf.copy(out, 0, 0, pos);
  return out;
}
