/**
 * Permission queries (src/domain/permission-query.ts): `a AND (b OR c)`,
 * AND binding tighter than OR, case-insensitive operators, and syntax errors
 * as InvalidArgumentError naming the request field.
 */
import { describe, expect, it } from "vitest";
import { InvalidArgumentError } from "../../src/domain/errors.js";
import {
  createPermissionQueryCache,
  evaluatePermissionQuery,
  parsePermissionQuery,
  type PermissionQuery,
} from "../../src/domain/permission-query.js";

const has = (q: string, perms: string[]) => evaluatePermissionQuery(parsePermissionQuery("permissions", q), perms);

function syntaxError(q: string): InvalidArgumentError {
  try {
    parsePermissionQuery("permissions", q);
  } catch (err) {
    if (err instanceof InvalidArgumentError) return err;
    throw err;
  }
  throw new Error(`expected "${q}" to be refused`);
}

describe("parsePermissionQuery", () => {
  it("parses a single permission name, including the characters permissions may hold", () => {
    expect(parsePermissionQuery("permissions", "docs.read")).toEqual({ op: "has", name: "docs.read" });
    expect(parsePermissionQuery("permissions", "  api:v1/keys-*_x  ")).toEqual({ op: "has", name: "api:v1/keys-*_x" });
  });

  it("binds AND tighter than OR", () => {
    const ast = parsePermissionQuery("permissions", "a OR b AND c");
    expect(ast).toEqual<PermissionQuery>({
      op: "or",
      args: [
        { op: "has", name: "a" },
        { op: "and", args: [{ op: "has", name: "b" }, { op: "has", name: "c" }] },
      ],
    });
    expect(parsePermissionQuery("permissions", "a AND b OR c")).toEqual<PermissionQuery>({
      op: "or",
      args: [
        { op: "and", args: [{ op: "has", name: "a" }, { op: "has", name: "b" }] },
        { op: "has", name: "c" },
      ],
    });
  });

  it("lets parentheses override precedence", () => {
    expect(parsePermissionQuery("permissions", "(a OR b) AND c")).toEqual<PermissionQuery>({
      op: "and",
      args: [
        { op: "or", args: [{ op: "has", name: "a" }, { op: "has", name: "b" }] },
        { op: "has", name: "c" },
      ],
    });
  });

  it("reads operators in any case, with or without spaces around parentheses", () => {
    expect(parsePermissionQuery("permissions", "a and (b Or c)")).toEqual(parsePermissionQuery("permissions", "a AND(b OR c)"));
  });

  it("refuses syntax errors with InvalidArgumentError naming the field", () => {
    // NOT is not an operator: "NOT a" is two names in a row.
    for (const q of ["", "   ", "a AND", "AND a", "a OR OR b", "(a OR b", "a OR b)", "()", "a b", "a && b", "a | b", "NOT a", "a AND (b"]) {
      const err = syntaxError(q);
      expect(err.field, JSON.stringify(q)).toBe("permissions");
      expect(err.reason, JSON.stringify(q)).toMatch(/syntax error/);
    }
  });

  it("names whatever field it is given", () => {
    try {
      parsePermissionQuery("checks[2].query", "(a");
      throw new Error("expected a refusal");
    } catch (err) {
      expect((err as InvalidArgumentError).field).toBe("checks[2].query");
    }
  });

  it("refuses a query longer than 1000 characters and one nested too deeply, without overflowing the stack", () => {
    expect(syntaxError(Array(300).fill("abcd").join(" OR ")).reason).toMatch(/at most 1000/);
    expect(syntaxError("(".repeat(40) + "a" + ")".repeat(40)).reason).toMatch(/nested too deeply/);
    expect(parsePermissionQuery("permissions", "(".repeat(30) + "a" + ")".repeat(30))).toEqual({ op: "has", name: "a" });
  });

  it("refuses a permission name longer than 128 characters", () => {
    expect(syntaxError("x".repeat(129)).field).toBe("permissions");
    expect(parsePermissionQuery("permissions", "x".repeat(128))).toEqual({ op: "has", name: "x".repeat(128) });
  });
});

describe("evaluatePermissionQuery", () => {
  const perms = ["docs.read", "docs.write", "billing:view"];

  it("is true exactly when the permissions satisfy the query", () => {
    expect(has("docs.read", perms)).toBe(true);
    expect(has("admin", perms)).toBe(false);
    expect(has("docs.read AND docs.write", perms)).toBe(true);
    expect(has("docs.read AND admin", perms)).toBe(false);
    expect(has("admin OR billing:view", perms)).toBe(true);
    expect(has("admin OR root", perms)).toBe(false);
    expect(has("docs.read AND (admin OR billing:view)", perms)).toBe(true);
    expect(has("(admin OR docs.write) AND root", perms)).toBe(false);
  });

  it("evaluates AND before OR", () => {
    // admin AND docs.read OR billing:view  ==  (admin AND docs.read) OR billing:view
    expect(has("admin AND docs.read OR billing:view", perms)).toBe(true);
    // docs.read OR admin AND root  ==  docs.read OR (admin AND root)
    expect(has("docs.read OR admin AND root", perms)).toBe(true);
    expect(has("(docs.read OR admin) AND root", perms)).toBe(false);
  });

  it("matches names exactly: no prefixes, no wildcards, case-sensitive", () => {
    expect(has("docs", perms)).toBe(false);
    expect(has("docs.*", perms)).toBe(false);
    expect(has("DOCS.READ", perms)).toBe(false);
    expect(has("docs.*", ["docs.*"])).toBe(true);
  });

  it("accepts the permissions as an array or a set", () => {
    const q = parsePermissionQuery("permissions", "a AND b");
    expect(evaluatePermissionQuery(q, new Set(["a", "b"]))).toBe(true);
    expect(evaluatePermissionQuery(q, new Set(["a"]))).toBe(false);
    expect(evaluatePermissionQuery(q, [])).toBe(false);
  });
});

describe("createPermissionQueryCache", () => {
  it("parses each distinct query once and returns the same tree for it", () => {
    const parse = createPermissionQueryCache();
    const first = parse("permissions", "a AND (b OR c)");
    expect(parse("permissions", "a AND (b OR c)")).toBe(first);
    expect(parse("permissions", "a AND b")).not.toBe(first);
  });

  it("does not remember a query that failed to parse", () => {
    const parse = createPermissionQueryCache();
    expect(() => parse("permissions", "a AND")).toThrow(InvalidArgumentError);
    expect(() => parse("permissions", "a AND")).toThrow(InvalidArgumentError);
  });

  it("keeps at most `max` queries, evicting the oldest", () => {
    const parse = createPermissionQueryCache(2);
    const a = parse("permissions", "a");
    parse("permissions", "b");
    parse("permissions", "c");
    expect(parse("permissions", "c")).toEqual({ op: "has", name: "c" });
    // "a" was evicted: parsed again into a new (equal) tree.
    const again = parse("permissions", "a");
    expect(again).toEqual(a);
    expect(again).not.toBe(a);
  });
});
