/*
 * The key layouts moved to ferretdb.ts with the other FerretDB workarounds;
 * this module re-exports them for the tests and scripts that import it.
 */
export * from "./ferretdb.js";
