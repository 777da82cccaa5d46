import { createHash } from "node:crypto";
import { InvalidArgumentError } from "./errors.js";

/**
 * Opaque page tokens: the last id of the page and a fingerprint of the query,
 * so a token used with other filters is refused instead of silently skipping.
 */
function fingerprint(query: unknown): string {
  return createHash("sha256").update(JSON.stringify(query)).digest("base64url").slice(0, 12);
}

export function encodePageToken(afterId: string, query: unknown): string {
  return Buffer.from(JSON.stringify({ a: afterId, q: fingerprint(query) })).toString("base64url");
}

export function decodePageToken(field: string, token: string, query: unknown): string | null {
  if (token === "") return null;
  try {
    if (token.length > 512) throw new Error("too long");
    const parsed = JSON.parse(Buffer.from(token, "base64url").toString("utf8")) as { a?: unknown; q?: unknown };
    if (typeof parsed.a !== "string" || typeof parsed.q !== "string" || parsed.a.length > 64) throw new Error("shape");
    if (parsed.q !== fingerprint(query)) throw new InvalidArgumentError(field, "was issued for a different query");
    return parsed.a;
  } catch (err) {
    if (err instanceof InvalidArgumentError) throw err;
    throw new InvalidArgumentError(field, "is not a valid page token");
  }
}
