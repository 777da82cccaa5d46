import http from "node:http";
import { readFileSync } from "node:fs";

/*
 * A closed-loop HTTP/1.1 load generator for Connect unary calls (what curl and
 * browsers send): `concurrency` keep-alive connections (node:http Agent), each
 * sending its next POST as soon as the previous answer is read, for a fixed
 * time; the bodies of a JSON array are sent in turn. Prints one JSON line:
 * calls/s, p50/p99 (ms), and the HTTP status codes.
 *   node dist/bench/http1-load.js <port> <path> <bodies.json> <headers.json> <concurrency> <seconds>
 * ghz speaks only gRPC; this plays its part for HTTP/1.1 (it costs more client
 * CPU per call than ghz, on the same cores as the server).
 */
const [portArg, path, bodiesFile, headersFile, concurrencyArg, secondsArg] = process.argv.slice(2);
const bodies = (JSON.parse(readFileSync(bodiesFile, "utf8")) as unknown[]).map((b) => Buffer.from(JSON.stringify(b)));
const extra = JSON.parse(readFileSync(headersFile, "utf8")) as Record<string, string>;
const concurrency = Number(concurrencyArg);
const durationMs = Number(secondsArg) * 1000;
const agent = new http.Agent({ keepAlive: true, maxSockets: concurrency });
const latencies: number[] = [];
const codes: Record<string, number> = {};
let next = 0;

function one(): Promise<void> {
  const body = bodies[next++ % bodies.length];
  const started = performance.now();
  return new Promise((resolve) => {
    const req = http.request(
      {
        agent,
        host: "127.0.0.1",
        port: Number(portArg),
        method: "POST",
        path,
        headers: { "content-type": "application/json", "content-length": body.length, ...extra },
      },
      (res) => {
        res.on("data", () => undefined);
        res.on("end", () => {
          latencies.push(performance.now() - started);
          codes[res.statusCode ?? 0] = (codes[res.statusCode ?? 0] ?? 0) + 1;
          resolve();
        });
      },
    );
    req.on("error", () => {
      codes.error = (codes.error ?? 0) + 1;
      resolve();
    });
    req.end(body);
  });
}

async function worker(until: number): Promise<void> {
  while (performance.now() < until) await one();
}

const started = performance.now();
await Promise.all(Array.from({ length: concurrency }, () => worker(started + durationMs)));
const elapsed = (performance.now() - started) / 1000;
latencies.sort((a, b) => a - b);
const pct = (p: number) => latencies[Math.min(latencies.length - 1, Math.floor((latencies.length * p) / 100))] ?? NaN;
process.stdout.write(JSON.stringify({ rps: latencies.length / elapsed, p50: pct(50), p99: pct(99), ok: codes["200"] ?? 0, codes }) + "\n");
agent.destroy();
