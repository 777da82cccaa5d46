import { Code, ConnectError, type ServiceImpl } from "@connectrpc/connect";
import { EventEmitter, on } from "node:events";
import { Health, HealthCheckResponse_ServingStatus as Status } from "../../gen/grpc/health/v1/health_pb.js";
import type { Logger } from "../server/logger.js";
import type { Store } from "../storage/store.js";

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

  constructor(
    private readonly store: Store,
    private readonly logger: Logger,
  ) {
    this.events.setMaxListeners(0);
  }

  get current(): Status {
    return this.status;
  }

  private set(s: Status): void {
    if (s === this.status) return;
    this.status = s;
    this.logger.info({ status: Status[s], ...(this.failing.size > 0 ? { failing: Object.fromEntries(this.failing) } : {}) }, "health changed");
    this.events.emit("change", s);
  }

  async check(): Promise<void> {
    if (this.draining) return;
    try {
      await this.store.ping();
      this.storeOk = true;
    } catch (err) {
      this.logger.warn({ err: (err as Error).message }, "store unreachable");
      this.storeOk = false;
    }
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
      let last = state.current;
      yield { status: last };
      // Ends when the client goes away or the server drains.
      const drained = new AbortController();
      const onDrain = () => drained.abort();
      state.events.once("drain", onDrain);
      try {
        for await (const [s] of on(state.events, "change", { signal: AbortSignal.any([ctx.signal, drained.signal]) })) {
          if (s !== last) {
            last = s as Status;
            yield { status: last };
          }
        }
      } catch (err) {
        if ((err as Error).name !== "AbortError") throw err;
        if (drained.signal.aborted && last !== Status.NOT_SERVING) yield { status: Status.NOT_SERVING };
      } finally {
        state.events.off("drain", onDrain);
      }
    },
  };
}
