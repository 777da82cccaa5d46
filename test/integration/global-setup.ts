/**
 * Vitest global setup: gives the integration harness (./support.ts) a directory
 * where it lists the pid of every process it starts (file name = pid, content = a
 * string of its command line), and on teardown kills any that a crashed or
 * interrupted test file left running. Runs outside the test context, so it does
 * not import the harness.
 */
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

function reapListed(dir: string): number {
  if (!existsSync(dir)) return 0;
  let reaped = 0;
  for (const name of readdirSync(dir)) {
    const file = path.join(dir, name);
    try {
      const marker = readFileSync(file, "utf8");
      // Only if the pid still runs what the harness started (pids are reused).
      if (marker && readFileSync(`/proc/${Number(name)}/cmdline`, "utf8").includes(marker)) {
        process.kill(Number(name), "SIGKILL");
        reaped++;
      }
    } catch {
      // already gone
    }
  }
  return reaped;
}

export default function setup(): () => void {
  const dir = mkdtempSync(path.join(tmpdir(), "latchkey-it-pids-"));
  process.env.LATCHKEY_IT_PIDS_DIR = dir;
  return () => {
    const reaped = reapListed(dir);
    if (reaped > 0) process.stderr.write(`integration teardown: killed ${reaped} leftover process(es)\n`);
    rmSync(dir, { recursive: true, force: true });
  };
}
