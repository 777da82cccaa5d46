import { InvalidArgumentError } from "./errors.js";

/**
 * Permission queries: `a AND (b OR c)`. Operands are permission names; AND
 * binds tighter than OR; operators are case-insensitive words. Parsed once per
 * distinct query and cached, since callers send the same few queries.
 */
export type PermissionQuery = { op: "and" | "or"; args: PermissionQuery[] } | { op: "has"; name: string };

const TOKEN = /\s*(\(|\)|[A-Za-z0-9_.:*/\-]+|\S)/y;
const MAX_QUERY = 1000;
const MAX_DEPTH = 32;

function tokenize(q: string): string[] {
  const out: string[] = [];
  TOKEN.lastIndex = 0;
  let m: RegExpExecArray | null;
  while (TOKEN.lastIndex < q.length && (m = TOKEN.exec(q))) out.push(m[1]);
  return out;
}

export function parsePermissionQuery(field: string, q: string): PermissionQuery {
  if (q.length > MAX_QUERY) throw new InvalidArgumentError(field, `must be at most ${MAX_QUERY} characters`);
  const tokens = tokenize(q.trim());
  let pos = 0;
  const fail = (what: string): never => {
    throw new InvalidArgumentError(field, `syntax error: ${what}`);
  };
  const isOp = (t: string | undefined, op: string) => t !== undefined && t.toUpperCase() === op;

  function expr(depth: number): PermissionQuery {
    if (depth > MAX_DEPTH) fail("nested too deeply");
    const args = [term(depth)];
    while (isOp(tokens[pos], "OR")) {
      pos++;
      args.push(term(depth));
    }
    return args.length === 1 ? args[0] : { op: "or", args };
  }
  function term(depth: number): PermissionQuery {
    const args = [factor(depth)];
    while (isOp(tokens[pos], "AND")) {
      pos++;
      args.push(factor(depth));
    }
    return args.length === 1 ? args[0] : { op: "and", args };
  }
  function factor(depth: number): PermissionQuery {
    const t = tokens[pos];
    if (t === undefined) return fail("unexpected end of query");
    if (t === "(") {
      pos++;
      const e = expr(depth + 1);
      if (tokens[pos] !== ")") fail(`expected ")" at token ${pos + 1}`);
      pos++;
      return e;
    }
    if (t === ")" || isOp(t, "AND") || isOp(t, "OR")) return fail(`unexpected "${t}" at token ${pos + 1}`);
    if (!/^[A-Za-z0-9_.:*/\-]{1,128}$/.test(t)) return fail(`invalid permission "${t.slice(0, 20)}"`);
    pos++;
    return { op: "has", name: t };
  }

  const ast = expr(0);
  if (pos !== tokens.length) fail(`unexpected "${tokens[pos]}" at token ${pos + 1}`);
  return ast;
}

export function evaluatePermissionQuery(q: PermissionQuery, has: ReadonlySet<string> | readonly string[]): boolean {
  switch (q.op) {
    case "has":
      return Array.isArray(has) ? has.includes(q.name) : (has as ReadonlySet<string>).has(q.name);
    case "and":
      return q.args.every((a) => evaluatePermissionQuery(a, has));
    case "or":
      return q.args.some((a) => evaluatePermissionQuery(a, has));
  }
}

/** A small bounded cache of parsed queries. */
export function createPermissionQueryCache(max = 1000) {
  const cache = new Map<string, PermissionQuery>();
  return (field: string, q: string): PermissionQuery => {
    let ast = cache.get(q);
    if (!ast) {
      ast = parsePermissionQuery(field, q);
      if (cache.size >= max) cache.delete(cache.keys().next().value!);
      cache.set(q, ast);
    }
    return ast;
  };
}
