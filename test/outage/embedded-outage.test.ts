/**
 * The embedded store's outage at the wire: its SQLite files become unwritable
 * under a steady load of verifications, then writable again.
 *
 * How: `prlimit --fsize=0` on the server process, so that every write(2) to a
 * file (the database, its -wal, the usage worker's) fails with EFBIG, which
 * SQLite reports as SQLITE_IOERR_WRITE — a disk that refuses writes. Making the
 * files unreadable or unwritable with chmod changes nothing for a process that
 * holds them open (and nothing at all for root), and `chattr +i` makes SQLite's
 * write to its memory-mapped -shm kill the process (SIGBUS): tried, and not
 * what a real outage looks like. Reads of an open SQLite database keep working
 * whatever happens to its files short of I/O errors, so this store's outages
 * are write outages.
 *
 * Asserted: verifications that need no write — cached or not — answer VALID
 * throughout and health stays SERVING (the store answers reads); a
 * verification that must spend credits and every write are refused with
 * UNAVAILABLE and leave nothing behind; once the files are writable again the
 * instance carries on by itself: writes work, the usage counted during the
 * outage is written, the balance holds exactly the credits of VALID answers.
 */
import { spawnSync } from "node:child_process";
import { afterEach, expect } from "vitest";
import { findTool, grpcClients, itWithTool, sleep, startServer, type GrpcClients, type Msg, type ServerProcess } from "../integration/support.js";
import { healthOf, statusOf, steadyLoad, tally, verifyOnce, type Outcome } from "./support.js";

const since = (t: number) => ({ seconds: String(Math.floor(t / 1000)), nanos: 0 });

/** Sets the soft limit on file size of process `pid` (the hard limit stays). */
function fileSizeLimit(prlimit: string, pid: number, soft: "0" | "unlimited"): void {
  const res = spawnSync(prlimit, ["--pid", String(pid), `--fsize=${soft}:`], { encoding: "utf8" });
  if (res.status !== 0) throw new Error(`prlimit failed: ${res.stderr}`);
}

const started: { servers: ServerProcess[]; clients: GrpcClients[] } = { servers: [], clients: [] };
afterEach(async () => {
  for (const c of started.clients.splice(0)) c.close();
  await Promise.all(started.servers.splice(0).map((s) => s.kill("SIGKILL")));
});

itWithTool(
  findTool("prlimit"),
  "prlimit",
  "keeps verifying while the embedded store cannot be written, refuses writes and spends, loses nothing, and carries on once it can",
  async (prlimit) => {
    const server = await startServer({
      env: { LATCHKEY_USAGE_FLUSH_MS: "200", LATCHKEY_ROOT_KEY_CACHE_MS: "1000", LATCHKEY_CACHE_TTL_MS: "2000", LATCHKEY_HEALTH_CHECK_INTERVAL_MS: "500" },
    });
    started.servers.push(server);
    const rootKey = server.bootstrapKey!;
    const c = grpcClients(server.address);
    started.clients.push(c);
    const call = (service: "keys" | "identities", method: string, req: Msg) => c.call(c[service], method, req, rootKey);
    const t0 = Date.now();

    const create = async (req: Msg) => {
      const res = await call("keys", "CreateKey", { api_id: "api_outage", ...req });
      return { id: res.key.id as string, plaintext: res.plaintext as string };
    };
    const plain = await create({ name: "plain" });
    const credited = await create({ name: "credited", credits: { remaining: "1000" } });
    const uncached = await create({ name: "uncached" });
    const seen: Outcome[] = [];
    const once = async (name: string, key: string) => {
      const o = await verifyOnce(c, rootKey, name, key);
      seen.push(o);
      return o.result;
    };
    const validOf = (name: string) => seen.filter((o) => o.key === name && o.result === "VALID").length;
    expect(await once("plain", plain.plaintext)).toBe("VALID");
    expect(await once("credited", credited.plaintext)).toBe("VALID");

    const load = steadyLoad(c, rootKey, { plain: plain.plaintext }, 3);
    while (load.count() < 30) await sleep(20);

    fileSizeLimit(prlimit, server.proc.pid!, "0");
    const refused = async (p: Promise<unknown>) => {
      try {
        await p;
        return "OK";
      } catch (err) {
        return statusOf(err);
      }
    };
    try {
      expect(await refused(call("keys", "CreateKey", { api_id: "api_outage", name: "created during the outage" }))).toBe("UNAVAILABLE");
      expect(await refused(call("keys", "UpdateKey", { key: { id: plain.id, name: "renamed during" }, update_mask: { paths: ["name"] } }))).toBe("UNAVAILABLE");
      expect(await refused(call("keys", "UpdateCredits", { key_id: credited.id, operation: "CREDITS_OPERATION_SET", value: "5" }))).toBe("UNAVAILABLE");
      // A spend is a write: refused, nothing spent.
      expect(await once("credited", credited.plaintext)).toBe("error:UNAVAILABLE");
      // Reads need no write: a key never verified before answers from the store.
      expect(await once("uncached", uncached.plaintext)).toBe("VALID");
      // Past every cache time (root key 1 s, entries 2 s), with the usage worker failing meanwhile.
      const during = load.count();
      await sleep(2500);
      expect(load.count()).toBeGreaterThan(during);
      expect(await healthOf(c)).toBe("SERVING");
    } finally {
      fileSizeLimit(prlimit, server.proc.pid!, "unlimited");
    }

    expect(await once("credited", credited.plaintext)).toBe("VALID");
    await sleep(300);
    const outcomes = await load.stop();
    seen.push(...outcomes);
    expect(tally(outcomes)).toEqual({ VALID: outcomes.length });

    // Nothing refused was written.
    const listed = await call("keys", "ListKeys", { api_id: "api_outage", page_size: 100 });
    expect((listed.keys as Msg[]).map((k) => k.name).sort()).toEqual(["credited", "plain", "uncached"]);
    expect(Number((await call("keys", "GetKey", { id: credited.id })).key.credits.remaining)).toBe(1000 - validOf("credited"));
    // Usage counted while the files could not be written is written now.
    for (const [name, id] of [["plain", plain.id], ["credited", credited.id], ["uncached", uncached.id]] as const) {
      for (let i = 0; ; i++) {
        const usage = await call("keys", "GetKeyUsage", { id, start_time: since(t0 - 86_400_000), granularity: "GRANULARITY_DAY" });
        if (Number(usage.totals.valid) === validOf(name) || i >= 50) {
          expect(Number(usage.totals.valid), `usage of ${name}`).toBe(validOf(name));
          break;
        }
        await sleep(100);
      }
    }
    // And writes work again.
    expect((await create({ name: "created after" })).id).toMatch(/^key_/);
  },
  60_000,
);
