import { ScalarType, type DescEnum, type DescField, type DescMessage, type DescService } from "@bufbuild/protobuf";
import { configureTextEncoding, getTextEncoding } from "@bufbuild/protobuf/wire";
import { InvalidArgumentError } from "../domain/errors.js";

/*
 * Requests are checked here, before any handler runs, for what protobuf decoding
 * lets through:
 *
 * - Invalid UTF-8 in a string field. proto3 strings must be UTF-8, but
 *   protobuf-es (2.10) decodes them with a lenient TextDecoder that turns bad
 *   bytes into U+FFFD, which is indistinguishable from a U+FFFD the client really
 *   sent. `markInvalidUtf8()` installs a decoder that decodes valid UTF-8 exactly
 *   as before and turns a string with invalid bytes into one holding lone
 *   surrogates, which no valid UTF-8 can produce; the check below refuses any
 *   string that is not well-formed UTF-16 and names its field. It also catches
 *   lone surrogates sent as `\ud800` escapes in Connect JSON. (Newer protobuf-es
 *   versions refuse invalid UTF-8 in fromBinary with an error naming no field;
 *   the decoder installed here ignores their `strict` argument, so the field
 *   keeps being named.)
 * - Enum numbers the enum does not define. proto3 enums are open, so `group_by: 99`
 *   decodes; every enum field of every request is checked against its values.
 */

const strictDecoder = new TextDecoder("utf-8", { fatal: true });
const lenientDecoder = new TextDecoder("utf-8");

/**
 * UTF-8 → string: valid input exactly as TextDecoder decodes it; input with
 * invalid bytes as a string whose replacement characters are lone surrogates, so
 * it cannot pass as text.
 */
export function decodeUtf8Marking(bytes?: Uint8Array): string {
  try {
    return strictDecoder.decode(bytes);
  } catch {
    // Rare: only malformed input gets here.
    return lenientDecoder.decode(bytes).replace(/\uFFFD/g, "\uDFFD");
  }
}

/**
 * For Connect-Node's JSON codec (`connectNodeAdapter({ jsonOptions })`):
 * - `textDecoder`: a JSON body with invalid UTF-8 bytes then holds lone
 *   surrogates, which the JSON decoder refuses as INVALID_ARGUMENT naming the
 *   field, instead of storing U+FFFD (escaped lone surrogates, `"\ud800"`, are
 *   refused without it). Connect-Node reads it at run time; its option type
 *   does not declare it.
 * - `ignoreUnknownFields`: true, Connect's default, stated here because it is a
 *   decision (README, "Limits on input"): unknown fields are ignored in JSON as in
 *   binary protobuf, so clients built from a newer proto keep working.
 */
export const connectJsonOptions = { ignoreUnknownFields: true, textDecoder: { decode: decodeUtf8Marking } };

let installed = false;

/** Installs the marking UTF-8 decoder for protobuf binary (process-wide; idempotent). */
export function markInvalidUtf8(): void {
  if (installed) return;
  installed = true;
  const base = getTextEncoding();
  configureTextEncoding({ encodeUtf8: base.encodeUtf8, checkUtf8: base.checkUtf8, decodeUtf8: decodeUtf8Marking });
}

const enumNumbers = new WeakMap<DescEnum, Set<number>>();

function isDefined(e: DescEnum, n: number): boolean {
  let set = enumNumbers.get(e);
  if (!set) enumNumbers.set(e, (set = new Set(e.values.map((v) => v.number))));
  return set.has(n);
}

const NOT_UTF8 = "must be valid UTF-8 text";

/** No lone surrogates (String.prototype.isWellFormed, Node 20+; not in the ES2022 lib types). */
const wellFormed = (s: string): boolean => (s as unknown as { isWellFormed(): boolean }).isWellFormed();

function checkString(field: string, v: unknown): void {
  if (typeof v === "string" && !wellFormed(v)) throw new InvalidArgumentError(field, NOT_UTF8);
}

function checkEnum(field: string, e: DescEnum, v: unknown): void {
  if (typeof v === "number" && !isDefined(e, v)) throw new InvalidArgumentError(field, `${v} is not a value of ${e.typeName}`);
}

/** google.protobuf.Struct / Value / ListValue fields hold plain JSON in protobuf-es. */
function checkJson(field: string, v: unknown, depth = 0): void {
  if (depth > 100) return; // the decoder's own recursion limit stops deeper messages
  if (typeof v === "string") {
    if (!wellFormed(v)) throw new InvalidArgumentError(field, "holds a string that is not valid UTF-8 text");
  } else if (Array.isArray(v)) {
    for (const x of v) checkJson(field, x, depth + 1);
  } else if (v !== null && typeof v === "object") {
    for (const [k, x] of Object.entries(v)) {
      if (!wellFormed(k)) throw new InvalidArgumentError(field, "holds a property name that is not valid UTF-8 text");
      checkJson(field, x, depth + 1);
    }
  }
}

const JSON_TYPES = new Set(["google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"]);

function checkMessageValue(field: string, desc: DescMessage, v: unknown): void {
  if (JSON_TYPES.has(desc.typeName)) return checkJson(field, v);
  // Wrapper types (google.protobuf.StringValue, ...) are unwrapped to their value.
  if (typeof v !== "object" || v === null) return checkString(field, v);
  checkFields(desc, v as Record<string, unknown>, `${field}.`);
}

function checkValue(f: DescField, name: string, v: unknown): void {
  switch (f.fieldKind) {
    case "scalar":
      if (f.scalar === ScalarType.STRING) checkString(name, v);
      return;
    case "enum":
      return checkEnum(name, f.enum, v);
    case "message":
      return checkMessageValue(name, f.message, v);
    case "list":
      // A plain loop, and an element's name only when it is wrong or a message
      // (whose fields are named after it): this runs for every list of every request.
      for (let i = 0, list = v as unknown[]; i < list.length; i++) {
        const x = list[i];
        if (f.listKind === "scalar") {
          if (f.scalar === ScalarType.STRING && typeof x === "string" && !wellFormed(x)) checkString(`${name}[${i}]`, x);
        } else if (f.listKind === "enum") {
          if (typeof x === "number" && !isDefined(f.enum, x)) checkEnum(`${name}[${i}]`, f.enum, x);
        } else checkMessageValue(`${name}[${i}]`, f.message, x);
      }
      return;
    case "map":
      for (const [k, x] of Object.entries(v as Record<string, unknown>)) {
        if (!wellFormed(k)) throw new InvalidArgumentError(name, "holds a key that is not valid UTF-8 text");
        const at = `${name}["${k}"]`;
        if (f.mapKind === "scalar") {
          if (f.scalar === ScalarType.STRING) checkString(at, x);
        } else if (f.mapKind === "enum") checkEnum(at, f.enum, x);
        else checkMessageValue(at, f.message, x);
      }
  }
}

function checkFields(desc: DescMessage, msg: Record<string, unknown>, prefix: string): void {
  for (const f of desc.fields) {
    let v: unknown;
    if (f.oneof) {
      const o = msg[f.oneof.localName] as { case?: string; value?: unknown } | undefined;
      if (o?.case !== f.localName) continue;
      v = o.value;
    } else {
      v = msg[f.localName];
    }
    if (v === undefined) continue;
    checkValue(f, prefix + f.name, v);
  }
}

/**
 * Throws InvalidArgumentError naming the first field of `message` that holds
 * text that is not valid UTF-8 or an enum number its enum does not define.
 * Field paths use proto names: `name`, `ratelimits[0].name`, `key.meta`, `tags[1]`.
 */
export function checkWellFormed(desc: DescMessage, message: object): void {
  checkFields(desc, message as Record<string, unknown>, "");
}

type Method = (req: object, ctx: unknown) => unknown;

/**
 * Wraps a service implementation so every request is checked with
 * checkWellFormed before its handler runs (after authentication, which the
 * interceptors do). Installs the marking UTF-8 decoder.
 */
export function withWellFormedRequests<T extends object>(service: DescService, impl: T): T {
  markInvalidUtf8();
  const out: Record<string, Method> = {};
  for (const m of service.methods) {
    const handler = (impl as Record<string, Method | undefined>)[m.localName];
    if (!handler) continue;
    out[m.localName] = async (req, ctx) => {
      checkWellFormed(m.input, req);
      return handler(req, ctx);
    };
  }
  return out as T;
}
