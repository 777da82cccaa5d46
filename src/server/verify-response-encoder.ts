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

function writeStruct(w: BinaryWriter, field: number, obj: JsonObject | undefined): void {
  if (obj === undefined) return;
  w.tag(field, LD).bytes(structBytes(obj));
}

function writeTimestamp(w: BinaryWriter, field: number, t: Timestamp | undefined): void {
  if (!t) return;
  w.tag(field, LD).fork();
  if (t.seconds !== 0n) w.tag(1, WireType.Varint).int64(t.seconds);
  if (t.nanos !== 0) w.tag(2, WireType.Varint).int32(t.nanos);
  w.join();
}

function str(w: BinaryWriter, field: number, s: string | undefined): void {
  if (s) w.tag(field, LD).string(s);
}

export function encodeVerifyKeyResponse(m: Init): Uint8Array {
  const w = new BinaryWriter();
  if (m.valid) w.tag(1, WireType.Varint).bool(true);
  if (m.code) w.tag(2, WireType.Varint).int32(m.code);
  str(w, 3, m.keyId);
  str(w, 4, m.name);
  writeStruct(w, 5, m.meta as JsonObject | undefined);
  writeTimestamp(w, 6, m.expiresAt as Timestamp | undefined);
  if (m.enabled) w.tag(7, WireType.Varint).bool(true);
  if (m.creditsRemaining !== undefined) w.tag(8, WireType.Varint).int64(m.creditsRemaining);
  for (const p of m.permissions ?? []) w.tag(9, LD).string(p);
  const id = m.identity;
  if (id) {
    w.tag(10, LD).fork();
    str(w, 1, id.id);
    str(w, 2, id.externalId);
    writeStruct(w, 3, id.meta as JsonObject | undefined);
    w.join();
  }
  for (const r of m.ratelimits ?? []) {
    w.tag(11, LD).fork();
    str(w, 1, r.name);
    if (r.limit) w.tag(2, WireType.Varint).int64(r.limit);
    if (r.remaining) w.tag(3, WireType.Varint).int64(r.remaining);
    writeTimestamp(w, 4, r.resetAt as Timestamp | undefined);
    if (r.exceeded) w.tag(5, WireType.Varint).bool(true);
    w.join();
  }
  str(w, 12, m.apiId);
  return w.finish();
}
