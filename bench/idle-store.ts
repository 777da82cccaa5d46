import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { MongoClient } from "mongodb";
import { freePort, startFerretDb, startLatchkey } from "./processes.js";
import { newId } from "../src/domain/ids.js";
import { generateKey } from "../src/domain/key-format.js";
import { createRootKey } from "../src/domain/root-keys.js";
import { MongoStore, toFeedDoc } from "../src/storage/mongodb/mongo-store.js";

/*
 * npm run bench:idle — what two idle instances cost the store after a long
 * history of changes (issue 10: "an idle instance's load on the store does not
 * grow with the store's history").
 *
 * Starts a FerretDB of its own (SQLite backend, temporary directory; the
 * binary from PATH or `go env GOPATH`/bin), two Latchkey instances on it, then
 * writes BENCH_IDLE_CHANGES [100000] change-feed entries (intent and done pairs
 * over BENCH_IDLE_KEYS [1000] keys, in bulk: through the API that would take
 * FerretDB most of an hour), after BENCH_IDLE_WRITES [200] real UpdateKey writes
 * through the store, and samples FerretDB's CPU (/proc/<pid>/stat) over
 * BENCH_IDLE_SAMPLE_S [20] seconds: right after the writes, and again once the
 * instances have pruned the feed.
 */
const CHANGES = Number(process.env.BENCH_IDLE_CHANGES ?? 100_000);
const KEYS = Number(process.env.BENCH_IDLE_KEYS ?? 1000);
const WRITES = Number(process.env.BENCH_IDLE_WRITES ?? 200);
const SAMPLE_S = Number(process.env.BENCH_IDLE_SAMPLE_S ?? 20);
const progress = (msg: string) => process.stderr.write(`bench:idle: ${msg}\n`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));




/** CPU seconds (user + system) a process has used so far. */
function cpuSeconds(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

/** Share of one core each process used over `seconds`. */
async function sampleCpu(pids: Record<string, number>, seconds: number): Promise<Record<string, number>> {
  const before = Object.fromEntries(Object.entries(pids).map(([k, pid]) => [k, cpuSeconds(pid)]));
  const t0 = Date.now();
  await sleep(seconds * 1000);
  const wall = (Date.now() - t0) / 1000;
  return Object.fromEntries(Object.entries(pids).map(([k, pid]) => [k, (cpuSeconds(pid) - before[k]) / wall]));
}


async function main() {
  const dir = mkdtempSync(join(tmpdir(), "latchkey-idle-"));
  try {
    const port = await freePort();
    const ferret = await startFerretDb(dir, port);
    const uri = `mongodb://127.0.0.1:${port}/`;
    const client = new MongoClient(uri);
    const database = "latchkey_idle";
    const store = new MongoStore({ uri, database });
    await store.init();
    await createRootKey(store, "bench", [{ action: "verify", apiId: null }]);
    const now = Date.now();
    const keys = Array.from({ length: KEYS }, (_, i) => {
      const secret = generateKey("sk", 16);
      return {
        id: newId("key", now),
        apiId: "bench",
        identityId: null,
        hash: secret.hash,
        start: secret.start,
        name: `key ${i}`,
        meta: {},
        enabled: true,
        expiresAt: null,
        credits: null,
        ratelimits: [],
        permissions: [],
        createdAt: now,
        updatedAt: now,
        lastUsedAt: null,
      };
    });
    await store.loadKeys(keys);

    const env = { MONGODB_URI: uri, LATCHKEY_MONGODB_DATABASE: database, LATCHKEY_RATELIMIT_BACKEND: "memory" };
    const instances = [(await startLatchkey(env)).proc, (await startLatchkey(env)).proc];
    const pids = { ferretdb: ferret.pid!, instanceA: instances[0].pid!, instanceB: instances[1].pid! };
    const idleBefore = await sampleCpu(pids, 5);

    const t0 = Date.now();
    const cpu0 = cpuSeconds(ferret.pid!);
    progress(`${WRITES} UpdateKey writes through the store`);
    for (let i = 0; i < WRITES; i++) await store.updateKey(keys[i % keys.length].id, { name: `w${i}` }, Date.now());
    // History: intent and done pairs over the keys, in bulk batches of contiguous seqs.
    progress(`writing ${CHANGES} change-feed entries`);
    const db = client.db(database);
    let seq = await store.lastChangeSeq();
    for (let written = 0; written < CHANGES; ) {
      const batch = [];
      for (let i = 0; i < 1000 && written < CHANGES; i += 2, written += 2) {
        const k = keys[(written / 2) % keys.length];
        const targets = { keys: [{ id: k.id, hash: k.hash }], identities: [] };
        batch.push(toFeedDoc(++seq, { phase: "intent", boundMs: 5000, ...targets }), toFeedDoc(++seq, { phase: "done", intent: seq - 1, ...targets }));
      }
      // Each entry in the store's collection for its seq, in seq order.
      for (let i = 0; i < batch.length; ) {
        const name = store.feedCollectionName(batch[i].seq);
        let j = i;
        while (j < batch.length && store.feedCollectionName(batch[j].seq) === name) j++;
        await db.collection(name).insertMany(batch.slice(i, j) as never[]);
        i = j;
      }
      // As the store's own appends do: the hint of the newest seq (see MongoStore.newestSeq).
      await db.collection("change_feed_head").updateOne({ _id: "head" as never }, { $max: { seq } }, { upsert: true });
    }
    const writeS = (Date.now() - t0) / 1000;
    const writeCpu = cpuSeconds(ferret.pid!) - cpu0;
    /** Entries left in the change feed's collections. */
    const retainedNow = async () => {
      let n = 0;
      for (const c of await db.listCollections({}, { nameOnly: true }).toArray()) if (/^change_feed_\d+$/.test(c.name)) n += await db.collection(c.name).countDocuments();
      return n;
    };
    const retained = await retainedNow();

    progress(`sampling idle CPU for ${SAMPLE_S} s right after the writes`);
    const afterBurst = await sampleCpu(pids, SAMPLE_S);
    progress(`waiting 20 s, then sampling again for ${SAMPLE_S} s`);
    await sleep(20_000);
    const later = await sampleCpu(pids, SAMPLE_S);
    const retainedLater = await retainedNow();

    const pct = (x: number) => `${(100 * x).toFixed(1)} %`;
    const lines = [
      `FerretDB ${uri} (own process, SQLite backend), two idle Latchkey instances (LATCHKEY_INVALIDATION_POLL_MS 250)`,
      `history: ${WRITES} UpdateKey writes through the store, then ${CHANGES} change-feed entries in bulk, in ${writeS.toFixed(1)} s (FerretDB CPU ${writeCpu.toFixed(1)} s)`,
      "",
      "| window | FerretDB | instance A | instance B | feed entries retained |",
      "|---|---|---|---|---|",
      `| idle, before the history (5 s) | ${pct(idleBefore.ferretdb)} | ${pct(idleBefore.instanceA)} | ${pct(idleBefore.instanceB)} | 0 |`,
      `| idle, first ${SAMPLE_S} s after the writes | ${pct(afterBurst.ferretdb)} | ${pct(afterBurst.instanceA)} | ${pct(afterBurst.instanceB)} | ${retained} at the start |`,
      `| idle, ${SAMPLE_S} s from ${SAMPLE_S + 20} s after | ${pct(later.ferretdb)} | ${pct(later.instanceA)} | ${pct(later.instanceB)} | ${retainedLater} |`,
    ];
    process.stdout.write(lines.join("\n") + "\n");
    for (const p of instances) p.kill("SIGTERM");
    await store.close();
    await client.close();
    ferret.kill("SIGTERM");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`bench:idle failed: ${(err as Error).stack}\n`);
    process.exit(1);
  },
);
