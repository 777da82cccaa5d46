import { pino, type Logger as PinoLogger } from "pino";

/** A log method: structured fields first, then the message (pino's argument order), or a message alone. */
export interface LogFn {
  (fields: object, msg?: string): void;
  (msg: string): void;
}

/**
 * What the rest of the code may log through: structured fields and a message,
 * at one of four levels. Only the composition root (src/main.ts) holds the pino
 * logger itself (for `fatal` and `flush` at exit).
 */
export interface Logger {
  debug: LogFn;
  info: LogFn;
  warn: LogFn;
  error: LogFn;
  /** Whether `debug` lines are written: skips building fields that would be dropped. */
  isLevelEnabled(level: "debug"): boolean;
}

/** The process logger: JSON lines on stdout (or `destination`, for tests). */
export type RootLogger = PinoLogger;

/** JSON lines on stdout (or `destination`, for tests). */
export function createLogger(level: string, destination?: NodeJS.WritableStream): RootLogger {
  return pino(
    { level, base: { service: "latchkey" }, timestamp: pino.stdTimeFunctions.isoTime, formatters: { level: (label) => ({ level: label }) } },
    destination ?? pino.destination({ fd: 1, sync: false }),
  );
}
