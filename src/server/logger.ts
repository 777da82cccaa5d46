import { pino, type Logger } from "pino";

export type { Logger };

/** JSON lines on stdout (or `destination`, for tests). */
export function createLogger(level: string, destination?: NodeJS.WritableStream): Logger {
  return pino(
    { level, base: { service: "latchkey" }, timestamp: pino.stdTimeFunctions.isoTime, formatters: { level: (label) => ({ level: label }) } },
    destination ?? pino.destination({ fd: 1, sync: false }),
  );
}
