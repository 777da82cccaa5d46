/* Small helpers of the MongoDB store's parts and its layout migration. */

/** Runs `fn` over `items`, at most `limit` at a time; rejects with the first failure (after the running ones end). */
export async function eachLimited<T>(items: T[], limit: number, fn: (item: T) => Promise<unknown>): Promise<void> {
  let next = 0;
  let stop = false;
  const worker = async () => {
    while (!stop && next < items.length) {
      try {
        await fn(items[next++]);
      } catch (err) {
        stop = true;
        throw err;
      }
    }
  };
  const results = await Promise.allSettled(Array.from({ length: Math.min(limit, items.length) }, worker));
  const failed = results.find((r) => r.status === "rejected");
  if (failed) throw (failed as PromiseRejectedResult).reason;
}

export { groupBy } from "../../domain/group-by.js";
