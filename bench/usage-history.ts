import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { MongoClient } from "mongodb";
import { emptyCounts, type UsageRow } from "../src/domain/usage.js";
import { MongoStore } from "../src/storage/mongodb/mongo-store.js";
import { DEFAULT_USAGE_ROLLUP_MS } from "../src/storage/mongodb/usage.js";
import { freePort, startFerretDb } from "./processes.js";

/*
 * npm run bench:usage-history — what the usage roll-up costs FerretDB under a
 * steady load once the usage collection holds a long history (on FerretDB 1.x
 * every query other than one `_id` — and even a delete by `_id $in` — is a
 * pass over the whole collection, so its cost grows with the rows kept).
 *
 * Starts a FerretDB of its own (SQLite backend, temporary directory), writes
 * BENCH_HISTORY_PACKS [6000] packs of 200 minute rows of other writer slots (the
 * shape the roll-up writes: ~40 hours of 1,000 keys, below the default 48 h
 * retention), then, for each way of deleting the older versions a roll-up
 * replaces — left by the timer's roll-ups and deleted together every 10 min
 * (the default), and at every roll-up (`usageSupersededDeleteMs: 0`, as before)
 * — runs a MongoStore writing a flush of BENCH_HISTORY_KEYS [1000] keys' minute
 * rows every second with the roll-up every LATCHKEY_USAGE_ROLLUP_MS (30 s),
 * and samples FerretDB's CPU over BENCH_HISTORY_SAMPLE_S [120] seconds after
 * its first roll-up.
 */
const PACKS = Number(process.env.BENCH_HISTORY_PACKS ?? 6000);
const KEYS = Number(process.env.BENCH_HISTORY_KEYS ?? 1000);
const SAMPLE_S = Number(process.env.BENCH_HISTORY_SAMPLE_S ?? 120);
const ROLLUP_MS = Number(process.env.LATCHKEY_USAGE_ROLLUP_MS ?? DEFAULT_USAGE_ROLLUP_MS);
const MINUTE = 60_000;
const progress = (msg: string) => process.stderr.write(`bench:usage-history: ${msg}\n`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function cpuSeconds(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

/** A pack as the roll-up writes one (usage.ts, toPacks): 200 rows of one minute bucket, their identities and keys listed. */
function historyPack(n: number, bucket: number) {
  const rows = Array.from({ length: 200 }, (_, r) => {
    const k = (n * 200 + r) % KEYS;
    return { k: `key_hist${String(k).padStart(22, "0")}`, i: `id_hist${String(k % 100).padStart(22, "0")}`, t: "", n: [3, 3, 0, 0, 0, 0, 0, 0] };
  });
  const slot = `hist-${n % 4}`;
  return { _id: `${slot}|minute|${bucket}#1|${n}|history`, s: slot, g: "minute", b: bucket, seq: 1, i: [...new Set(rows.map((r) => r.i))], k: rows.map((r) => r.k), data: JSON.stringify(rows) };
}

async function main() {
  const dir = mkdtempSync(join(tmpdir(), "latchkey-usage-history-"));
  try {
    const port = await freePort();
    const ferret = await startFerretDb(dir, port);
    const uri = `mongodb://127.0.0.1:${port}/`;
    const database = "latchkey_usage_history";
    const setup = new MongoStore({ uri, database, usageRollupMs: 0 });
    await setup.init();
    await setup.close();
    const client = new MongoClient(uri);
    const usage = client.db(database).collection("usage");
    progress(`writing ${PACKS} packs of history`);
    const perMinute = Math.max(1, Math.ceil(KEYS / 200));
    const first = Math.floor(Date.now() / MINUTE) * MINUTE - Math.ceil(PACKS / perMinute) * MINUTE - 10 * MINUTE;
    for (let n = 0; n < PACKS; ) {
      const docs = [];
      for (let j = 0; j < 100 && n < PACKS; j++, n++) docs.push(historyPack(n, first + Math.floor(n / perMinute) * MINUTE));
      await usage.insertMany(docs as never[]);
    }
    // One delete of three `_id`s that are not there: what each roll-up's delete of older versions costs FerretDB alone.
    let c0 = cpuSeconds(ferret.pid!);
    await usage.deleteMany({ _id: { $in: ["none-1", "none-2", "none-3"] } } as never);
    const deleteCpu = cpuSeconds(ferret.pid!) - c0;

    const results: { mode: string; share: number; rollups: number; deletes: number }[] = [];
    for (const [mode, deferMs] of [["left for a delete every 10 min (now)", undefined], ["deleted at every roll-up (before)", 0]] as const) {
      let deletes = 0;
      let rolledOnce: () => void = () => undefined;
      const firstRollup = new Promise<void>((r) => (rolledOnce = r));
      const store = new MongoStore({ uri, database, usageRollupMs: ROLLUP_MS, usageSupersededDeleteMs: deferMs, monitorCommands: true });
      await store.init();
      const deleting = new Set<number>();
      store.client.on("commandStarted", (e) => {
        if (e.commandName === "delete" && e.command.delete === "usage") deletes++;
        // A roll-up deletes the log documents it applied last: the first one's reads of the usage collection are over.
        if (e.commandName === "delete" && e.command.delete === "usage_log") deleting.add(e.requestId);
      });
      store.client.on("commandSucceeded", (e) => {
        if (deleting.has(e.requestId)) rolledOnce();
      });
      const writer = `bench-${deferMs ?? "deferred"}`;
      let seq = 0;
      let stop = false;
      const flushes = (async () => {
        while (!stop) {
          const bucket = Math.floor(Date.now() / MINUTE) * MINUTE;
          const rows: UsageRow[] = Array.from({ length: KEYS }, (_, k) => ({
            granularity: "minute",
            bucket,
            keyId: `key_live${String(k).padStart(22, "0")}`,
            identityId: `id_live${String(k % 100).padStart(22, "0")}`,
            tag: "",
            counts: { ...emptyCounts(), total: 5, valid: 5 },
          }));
          await store.writeUsage(rows, { writer, seq: ++seq });
          await sleep(1000);
        }
      })();
      progress(`${mode}: flushes every second, the roll-up every ${ROLLUP_MS} ms; sampling FerretDB's CPU for ${SAMPLE_S} s after the first roll-up`);
      await firstRollup;
      const deletesBefore = deletes;
      c0 = cpuSeconds(ferret.pid!);
      const t0 = Date.now();
      await sleep(SAMPLE_S * 1000);
      const share = (cpuSeconds(ferret.pid!) - c0) / ((Date.now() - t0) / 1000);
      stop = true;
      await flushes;
      results.push({ mode, share, rollups: Math.floor((SAMPLE_S * 1000) / ROLLUP_MS), deletes: deletes - deletesBefore });
      await store.close();
    }
    await client.close();
    ferret.kill("SIGKILL");
    const lines = [
      `FerretDB (own process, SQLite backend); history: ${PACKS} packs of 200 minute rows in the usage collection; load: a flush of ${KEYS} keys' minute rows every second, the roll-up every ${ROLLUP_MS} ms`,
      `one \`_id $in\` delete on that collection: ${(deleteCpu * 1000).toFixed(0)} ms of FerretDB's CPU`,
      "",
      `| older versions of the rows | FerretDB CPU over ${SAMPLE_S} s (share of a core) | deletes on the usage collection in the window |`,
      "|---|---|---|",
      ...results.map((r) => `| ${r.mode} | ${(100 * r.share).toFixed(1)} % | ${r.deletes} |`),
    ];
    process.stdout.write(lines.join("\n") + "\n");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`bench:usage-history failed: ${(err as Error).stack ?? String(err)}\n`);
    process.exit(1);
  },
);
