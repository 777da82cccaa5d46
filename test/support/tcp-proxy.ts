/**
 * A TCP proxy in front of a store (MongoDB/FerretDB, Redis) for fault tests: it
 * forwards bytes both ways and lets a test delay, hold or cut what a client
 * sends — a gate at the wire for processes the test cannot reach into.
 *
 * - `delayMs`: every chunk a client sends waits this long (order kept).
 * - `holdWhen(match)`: from the first client chunk `match` accepts, that chunk
 *   and everything any client sends after it are held until `release()`. The
 *   returned promise resolves when the match is seen.
 * - `pause()` / `release()`: hold everything clients send from now on / let it go.
 */
import net from "node:net";

export interface TcpProxy {
  readonly port: number;
  /** "127.0.0.1:PORT". */
  readonly address: string;
  delayMs: number;
  holdWhen(match: (chunk: Buffer) => boolean): Promise<void>;
  pause(): void;
  release(): void;
  /** Chunks held right now. */
  held(): number;
  close(): Promise<void>;
}

/** True when a MongoDB wire message carries the command `command` on collection `collection`. */
export function isMongoCommand(chunk: Buffer, command: string, collection: string): boolean {
  // A BSON string element: type 0x02, the name, NUL, int32 length, the value, NUL.
  const name = Buffer.from(`\x02${command}\x00`, "latin1");
  const at = chunk.indexOf(name);
  if (at < 0) return false;
  const value = chunk.subarray(at + name.length + 4, at + name.length + 4 + collection.length + 1);
  return value.equals(Buffer.from(`${collection}\x00`, "latin1"));
}

export async function startTcpProxy(target: { host: string; port: number }): Promise<TcpProxy> {
  let holding = false;
  let matcher: { match: (c: Buffer) => boolean; seen: () => void } | null = null;
  const held: (() => void)[] = [];
  const sockets = new Set<net.Socket>();
  const state = { delayMs: 0 };

  const server = net.createServer((client) => {
    const upstream = net.connect(target.port, target.host);
    sockets.add(client).add(upstream);
    let chain = Promise.resolve();
    const forward = (chunk: Buffer) => {
      if (!upstream.destroyed) upstream.write(chunk);
    };
    client.on("data", (chunk: Buffer) => {
      if (matcher && matcher.match(chunk)) {
        holding = true;
        matcher.seen();
        matcher = null;
      }
      const delay = state.delayMs;
      chain = chain.then(async () => {
        if (delay > 0) await new Promise((r) => setTimeout(r, delay));
        if (holding) await new Promise<void>((r) => held.push(r));
        forward(chunk);
      });
    });
    upstream.on("data", (chunk: Buffer) => {
      if (!client.destroyed) client.write(chunk);
    });
    const end = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on("close", end).on("error", end);
    upstream.on("close", end).on("error", end);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const release = () => {
    holding = false;
    for (const go of held.splice(0)) go();
  };
  const port = (server.address() as net.AddressInfo).port;

  return {
    port,
    address: `127.0.0.1:${port}`,
    get delayMs() {
      return state.delayMs;
    },
    set delayMs(v: number) {
      state.delayMs = v;
    },
    holdWhen(match) {
      return new Promise<void>((seen) => (matcher = { match, seen }));
    },
    pause() {
      holding = true;
    },
    release,
    held: () => held.length,
    async close() {
      release();
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
