import { Code, ConnectError, type ServiceImpl } from "@connectrpc/connect";
import { EventEmitter } from "node:events";
import { Health, HealthCheckResponse_ServingStatus as Status } from "../../gen/grpc/health/v1/health_pb.js";
import type { Logger } from "../observability/logger.js";
import type { StoreProbe } from "../domain/ports/store-probe.js";

function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

/**
 * Serving state of the process: SERVING while the store answers pings, every
 * other condition set with `setCondition` holds and the server is not
 * draining, NOT_SERVING otherwise.
 */
export class HealthState {
  private status: Status = Status.NOT_SERVING;
  private draining = false;
  private storeOk = false;
  /** Conditions that do not hold, with why (e.g. the change feed is behind). */
  private readonly failing = new Map<string, string>();
  private timer: NodeJS.Timeout | null = null;
  readonly events = new EventEmitter();
  /** Most concurrent Watch streams; each holds a stream and listeners until its client goes. */
  readonly maxWatchers: number;
  /** Watch streams open now. */
  watchers = 0;

  constructor(
    private readonly store: StoreProbe,
    private readonly logger: Logger,
    opts: { maxWatchers?: number } = {},
  ) {
    this.events.setMaxListeners(0);
    this.maxWatchers = opts.maxWatchers ?? 1000;
  }

  /** The error refusing one more Watch, or undefined while there is room. */
  watchRefusal(): ConnectError | undefined {
    if (this.watchers < this.maxWatchers) return undefined;
    return new ConnectError(`too many health watchers (at most ${this.maxWatchers}); use Check`, Code.ResourceExhausted);
  }

  get current(): Status {
    return this.status;
  }

  /** Settles on the next change of status (or drain); Watch streams share it instead of a listener each. */
  private nextChange = deferred();

  /** Resolves at the next change of status or when the server drains. */
  get changed(): Promise<void> {
    return this.nextChange.promise;
  }

  get isDraining(): boolean {
    return this.draining;
  }

  private notify(): void {
    const settled = this.nextChange;
    this.nextChange = deferred();
    settled.resolve();
  }

  private set(s: Status): void {
    if (s === this.status) return;
    this.status = s;
    this.logger.info({ status: Status[s], ...(this.failing.size > 0 ? { failing: Object.fromEntries(this.failing) } : {}) }, "health changed");
    this.events.emit("change", s);
    this.notify();
  }

  /** Checks started, so that a slow check does not overwrite the answer of a later one. */
  private checks = 0;

  /** Pings the store (through its guard: a ping that does not answer in time marks it unreachable). */
  async check(): Promise<void> {
    if (this.draining) return;
    const n = ++this.checks;
    let ok = true;
    let why = "";
    try {
      await this.store.ping();
    } catch (err) {
      ok = false;
      why = (err as Error).message;
    }
    if (n !== this.checks) return;
    if (ok !== this.storeOk) {
      if (ok) this.logger.info("store answers the health check");
      else this.logger.warn({ err: why }, "store does not answer the health check");
    }
    this.storeOk = ok;
    this.update();
  }

  /** Sets whether another condition of serving holds: `failing` says why not, null that it does. */
  setCondition(name: string, failing: string | null): void {
    if (failing === null) this.failing.delete(name);
    else this.failing.set(name, failing);
    this.update();
  }

  private update(): void {
    if (this.draining) return;
    this.set(this.storeOk && this.failing.size === 0 ? Status.SERVING : Status.NOT_SERVING);
  }

  /** Pings now and then every `intervalMs`. */
  async start(intervalMs: number): Promise<void> {
    await this.check();
    this.timer = setInterval(() => void this.check(), intervalMs);
    this.timer.unref();
  }

  /** NOT_SERVING from now on (graceful shutdown). */
  drain(): void {
    this.draining = true;
    if (this.timer) clearInterval(this.timer);
    this.set(Status.NOT_SERVING);
    this.events.emit("drain");
    this.notify();
  }
}

/** Services whose health is reported; "" is the server as a whole. */
const SERVICES = new Set(["", "latchkey.v1.IdentityService", "latchkey.v1.KeyService"]);

/** grpc.health.v1.Health: Check and Watch. */
export function createHealthService(state: HealthState): ServiceImpl<typeof Health> {
  return {
    check(req) {
      if (!SERVICES.has(req.service)) throw new ConnectError(`unknown service "${req.service}"`, Code.NotFound);
      return { status: state.current };
    },
    async *watch(req, ctx) {
      if (!SERVICES.has(req.service)) {
        yield { status: Status.SERVICE_UNKNOWN };
        return;
      }
      // Each open Watch holds a stream and some memory (about 40 KB, most of it
      // Connect-Node's): their number is bounded, Check is not.
      const refusal = state.watchRefusal();
      if (refusal) throw refusal;
      state.watchers++;
      try {
        let last = state.current;
        yield { status: last };
        // Ends when the client goes away or the server drains. One shared promise
        // for all watchers, one abort listener each.
        const gone = new Promise<void>((resolve) => ctx.signal.addEventListener("abort", () => resolve(), { once: true }));
        while (!ctx.signal.aborted) {
          if (state.current !== last) {
            last = state.current;
            yield { status: last };
          }
          if (state.isDraining) return;
          await Promise.race([state.changed, gone]);
        }
      } finally {
        state.watchers--;
      }
    },
  };
}
