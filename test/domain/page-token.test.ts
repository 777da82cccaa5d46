import { describe, expect, it } from "vitest";
import { InvalidArgumentError } from "../../src/domain/errors.js";
import { newId } from "../../src/domain/ids.js";
import { decodePageToken, encodePageToken } from "../../src/domain/page-token.js";

function refusal(fn: () => unknown): InvalidArgumentError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(InvalidArgumentError);
    return err as InvalidArgumentError;
  }
  throw new Error("expected an InvalidArgumentError");
}

describe("page tokens", () => {
  it("round-trip the last id for the same query", () => {
    const id = newId("key");
    const query = { a: "api1", i: "", e: "" };
    expect(decodePageToken("page_token", encodePageToken(id, query), { ...query })).toBe(id);
  });

  it("are opaque: no id or filter in plain sight", () => {
    const id = newId("id");
    const token = encodePageToken(id, { search: "acme" });
    expect(token).not.toContain(id);
    expect(token).not.toContain("acme");
    expect(token).toMatch(/^[A-Za-z0-9_-]+$/);
  });

  it("mean the first page when empty", () => {
    expect(decodePageToken("page_token", "", { search: "" })).toBeNull();
  });

  it("are refused for a different query, naming the field", () => {
    const token = encodePageToken(newId("id"), { search: "a" });
    const err = refusal(() => decodePageToken("page_token", token, { search: "b" }));
    expect(err.field).toBe("page_token");
    expect(err.message).toMatch(/^page_token: /);
    refusal(() => decodePageToken("page_token", token, { a: "a", i: "", e: "" }));
  });

  it.each([
    ["garbage", "!!!"],
    ["base64 of garbage", Buffer.from("garbage").toString("base64url")],
    ["a non-string id", Buffer.from(JSON.stringify({ a: { $gt: "" }, q: "x" })).toString("base64url")],
    ["a missing fingerprint", Buffer.from(JSON.stringify({ a: "id_1" })).toString("base64url")],
    ["an overlong id", Buffer.from(JSON.stringify({ a: "x".repeat(65), q: "x" })).toString("base64url")],
    ["more than 512 characters", "A".repeat(513)],
    ["JSON null", Buffer.from("null").toString("base64url")],
  ])("are refused when %s", (_what, token) => {
    expect(refusal(() => decodePageToken("page_token", token, {})).field).toBe("page_token");
  });
});
