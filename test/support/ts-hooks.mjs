/**
 * Module hooks for running the test fixtures' TypeScript in a child process
 * (`node --experimental-transform-types --import ./test/support/ts-register.mjs
 * fixture.ts`): Node compiles the TypeScript itself; these hooks map the `.js`
 * specifiers TypeScript sources use to the `.ts` files beside them.
 */
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";

export async function resolve(specifier, context, next) {
  if (specifier.endsWith(".js") && (specifier.startsWith(".") || specifier.startsWith("file:")) && context.parentURL) {
    const url = new URL(specifier, context.parentURL);
    if (!existsSync(fileURLToPath(url))) {
      const ts = new URL(url.href.slice(0, -3) + ".ts");
      if (existsSync(fileURLToPath(ts))) return next(ts.href, context);
    }
  }
  return next(specifier, context);
}
