import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { Worker } from "node:worker_threads";
import { UnavailableError } from "../../domain/errors.js";
import { COUNTERS, type UsageRow } from "../../domain/usage.js";
import { asStoreError } from "./sqlite-errors.js";

/** Requests to the usage worker (usage-worker.ts). Rows travel as flat arrays: cheap to copy. */
export type UsageWorkerRequest =
  | {
      id: number;
      op: "write";
      writer: string;
      seq: number;
      /** JSON array: key id, identity id ("" for none), tag — three per minute row. */
      strings: string;
      /** Minute then the counters in COUNTERS order — ten per row. */
      numbers: Float64Array;
      /** The process's clock: minutes over by a minute are rolled up into hour and day rows (usage-rollup.ts). */
      now: number;
    }
  | { id: number; op: "touch"; /** JSON array of key ids. */ ids: string; times: Float64Array }
  | { id: number; op: "close" };

export type UsageWorkerReply = { id: number; ok: true } | { id: number; ok: false; message: string; code: string };

/** Where the worker's compiled code is: beside this module, or in dist/ when the sources run as TypeScript (vitest). */
function workerUrl(): URL {
  const beside = new URL("./usage-worker.js", import.meta.url);
  if (existsSync(fileURLToPath(beside))) return beside;
  const built = new URL("../../../dist/src/storage/embedded/usage-worker.js", import.meta.url);
  if (existsSync(fileURLToPath(built))) return built;
  throw new Error("the embedded store's usage worker is not built: run `npm run build`");
}

type Request = UsageWorkerRequest extends infer R ? (R extends { id: number } ? Omit<R, "id"> : never) : never;

/**
 * The main-thread side of the usage worker: sends usage batches and last-used
 * times to the worker thread and resolves when they are committed. A worker that
 * dies fails what it had in hand (the recorder retries the same batch, which is
 * idempotent) and is started again on the next request.
 */
export class UsageWriter {
  private worker: Worker | null = null;
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: () => void; reject: (err: Error) => void }>();

  constructor(private readonly path: string) {}

  /** Minute rows only: the store derives hour and day rows from them (usage-rollup.ts). */
  async writeUsage(rows: UsageRow[], batch: { writer: string; seq: number }): Promise<void> {
    if (rows.length === 0) return;
    const strings: string[] = new Array(rows.length * 3);
    const numbers = new Float64Array(rows.length * 10);
    for (let i = 0; i < rows.length; i++) {
      const r = rows[i];
      if (r.granularity !== "minute") throw new Error(`the embedded store derives ${r.granularity} rows itself; writeUsage takes minute rows`);
      strings[i * 3] = r.keyId;
      strings[i * 3 + 1] = r.identityId ?? "";
      strings[i * 3 + 2] = r.tag;
      numbers[i * 10] = r.bucket;
      for (let j = 0; j < COUNTERS.length; j++) numbers[i * 10 + 1 + j] = r.counts[COUNTERS[j]];
    }
    await this.send({ op: "write", writer: batch.writer, seq: batch.seq, strings: JSON.stringify(strings), numbers, now: Date.now() }, [numbers.buffer]);
  }

  async touchLastUsed(times: Map<string, number>): Promise<void> {
    if (times.size === 0) return;
    const t = Float64Array.from(times.values());
    await this.send({ op: "touch", ids: JSON.stringify([...times.keys()]), times: t }, [t.buffer]);
  }

  /** Waits for what was sent, closes the worker's connection and ends the thread. */
  async close(): Promise<void> {
    const worker = this.worker;
    if (!worker) return;
    try {
      await this.send({ op: "close" });
    } finally {
      this.worker = null;
      await worker.terminate();
    }
  }

  private send(req: Request, transfer: ArrayBuffer[] = []): Promise<void> {
    const worker = this.worker ?? this.start();
    const id = this.nextId++;
    return new Promise<void>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      worker.ref();
      worker.postMessage({ ...req, id }, transfer);
    });
  }

  private start(): Worker {
    const worker = new Worker(workerUrl(), { workerData: { path: this.path } });
    worker.unref();
    worker.on("message", (reply: UsageWorkerReply) => {
      const p = this.pending.get(reply.id);
      if (!p) return;
      this.pending.delete(reply.id);
      if (this.pending.size === 0) worker.unref();
      if (reply.ok) p.resolve();
      else p.reject(asStoreError(Object.assign(new Error(reply.message), { code: reply.code })));
    });
    const fail = (err: Error) => {
      if (this.worker === worker) this.worker = null;
      for (const p of this.pending.values()) p.reject(new UnavailableError(`embedded store usage writer: ${err.message}`));
      this.pending.clear();
    };
    worker.on("error", fail);
    worker.on("exit", (code) => fail(new Error(`worker exited with code ${code}`)));
    this.worker = worker;
    return worker;
  }
}
