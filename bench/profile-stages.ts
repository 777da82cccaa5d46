import { readFileSync } from "node:fs";
import { join } from "node:path";

/*
 * Per-stage CPU of the server in each measured run of `BENCH_PROFILE=<dir> npm run bench`:
 *   node dist/bench/profile-stages.js <dir> [run filter]
 * TOP=n lists the n functions with the most self time (STAGE=<part of a stage's name>: within that stage).
 * Only the samples taken while that run's load generator ran are read (windows.json,
 * on the monotonic clock the profiles use). Each sample goes to the stage of the
 * innermost frame that belongs to one (walking from the leaf to the root), so work
 * Node does for a stage (a SHA-256, a stream write) counts in that stage, except
 * HTTP/2 core, which is a stage of its own wherever it is called from.
 */

interface CallFrame {
  functionName: string;
  url: string;
}
interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  children?: number[];
}
interface Profile {
  nodes: ProfileNode[];
  startTime: number;
  samples: number[];
  timeDeltas: number[];
}
interface Window {
  profile: string;
  run: string;
  fromUs: number;
  toUs: number;
  calls: number;
  cpuUs: number;
}

/** Stages, tried in order on each frame from the leaf up; the first that matches takes the sample. */
const STAGES: [string, (f: CallFrame) => boolean][] = [
  ["GC", (f) => f.functionName === "(garbage collector)"],
  ["native, outside JS (socket I/O, nghttp2, libuv)", (f) => f.functionName === "(program)"],
  ["HTTP/2 in Node core (headers, frames, streams)", (f) => /node:internal\/http2|node:http2/.test(f.url)],
  ["front door (stream bookkeeping, root key check at the door)", (f) => /\/src\/server\/(http-server|admission)\./.test(f.url)],
  ["lean gRPC path (envelope, call context, respond)", (f) => /\/src\/server\/grpc-unary\./.test(f.url)],
  ["encode response (hand-written encoder)", (f) => /\/src\/server\/verify-response-encoder\./.test(f.url)],
  ["protobuf (decode request / reflective encode)", (f) => /@bufbuild\/protobuf/.test(f.url)],
  ["metrics (prom-client, hit window)", (f) => /prom-client|\/src\/server\/metrics\./.test(f.url)],
  ["logging", (f) => /pino|\/src\/server\/logger\./.test(f.url)],
  ["cache lookup", (f) => /\/src\/cache\//.test(f.url)],
  ["rate limits", (f) => /\/src\/ratelimit\//.test(f.url)],
  ["usage counting", (f) => /\/src\/usage\//.test(f.url)],
  ["root key auth (interceptor)", (f) => /\/src\/domain\/root-keys\./.test(f.url)],
  ["key checksum + SHA-256", (f) => /\/src\/domain\/key-format\./.test(f.url)],
  ["verification logic (checks, limits, credits)", (f) => /\/src\/domain\//.test(f.url)],
  ["interceptors (request id, error mapping, auth)", (f) => /\/src\/rpc\/interceptors\./.test(f.url)],
  ["handler (proto ⇄ domain)", (f) => /\/src\/rpc\//.test(f.url)],
  ["store", (f) => /\/src\/storage\//.test(f.url)],
  ["Connect-Node", (f) => /@connectrpc/.test(f.url)],
  ["grpc-js", (f) => /@grpc\/grpc-js/.test(f.url)],
  ["baseline handler", (f) => /\/bench\//.test(f.url)],
];
const OTHER = "Node core / event loop (promises, timers, streams)";

function stagesOf(p: Profile, from: number, to: number): { byStage: Map<string, number>; busyUs: number; top: Map<string, number> } {
  const byId = new Map(p.nodes.map((n) => [n.id, n]));
  const parent = new Map<number, number>();
  for (const n of p.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const stageOf = new Map<number, string | null>();
  const classify = (id: number): string | null => {
    if (stageOf.has(id)) return stageOf.get(id)!;
    const f = byId.get(id)!.callFrame;
    if (f.functionName === "(idle)") return null;
    let s = STAGES.find(([, m]) => m(f))?.[0];
    if (s === undefined) {
      const up = parent.get(id);
      s = up === undefined ? OTHER : (classify(up) ?? OTHER);
    }
    stageOf.set(id, s);
    return s;
  };
  const byStage = new Map<string, number>();
  const top = new Map<string, number>();
  let t = p.startTime;
  let busyUs = 0;
  for (let i = 0; i < p.samples.length; i++) {
    t += p.timeDeltas[i];
    if (t < from || t > to) continue;
    const dt = p.timeDeltas[i + 1] ?? 0;
    const stage = classify(p.samples[i]);
    if (stage === null) continue;
    busyUs += dt;
    byStage.set(stage, (byStage.get(stage) ?? 0) + dt);
    if (process.env.STAGE && !stage.includes(process.env.STAGE)) continue;
    const f = byId.get(p.samples[i])!.callFrame;
    const name = `${f.functionName || "(anonymous)"} ${f.url.replace(/^.*\/(node_modules\/)?/, "")}`;
    top.set(name, (top.get(name) ?? 0) + dt);
  }
  return { byStage, busyUs, top };
}

const [dir, filter] = process.argv.slice(2);
const windows = JSON.parse(readFileSync(join(dir, "windows.json"), "utf8")) as Window[];
const loaded = new Map<string, Profile>();
for (const w of windows) {
  if (w.run.includes("warm-up") || (filter && !`${w.profile} ${w.run}`.includes(filter))) continue;
  let p = loaded.get(w.profile);
  if (!p) loaded.set(w.profile, (p = JSON.parse(readFileSync(join(dir, w.profile), "utf8")) as Profile));
  const { byStage, busyUs, top } = stagesOf(p, w.fromUs, w.toUs);
  const lines = [
    `### ${w.profile}: ${w.run}`,
    "",
    `${w.calls} calls; server CPU (all threads, /proc) ${Math.round(w.cpuUs)} µs/call; main thread busy (profile) ${(busyUs / w.calls).toFixed(1)} µs/call`,
    "",
    "| stage | µs/call | share |",
    "|---|---|---|",
  ];
  for (const [stage, us] of [...byStage].sort((a, b) => b[1] - a[1])) {
    lines.push(`| ${stage} | ${(us / w.calls).toFixed(1)} | ${((100 * us) / busyUs).toFixed(1)} % |`);
  }
  if (process.env.TOP) {
    lines.push("", "Top self time:", "");
    for (const [name, us] of [...top].sort((a, b) => b[1] - a[1]).slice(0, Number(process.env.TOP))) lines.push(`- ${(us / w.calls).toFixed(2)} µs ${name}`);
  }
  process.stdout.write(lines.join("\n") + "\n\n");
}
