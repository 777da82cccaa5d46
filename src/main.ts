#!/usr/bin/env node
import { mkdir, open, rename, rm } from "node:fs/promises";
import path from "node:path";
import { ConfigError, loadConfig } from "./config/config.js";
import { bootstrapRootKey, createApp } from "./app/compose.js";
import { createLogger, type RootLogger } from "./observability/logger.js";
import { createServerStore } from "./app/stores.js";

/** Where a fresh install leaves its bootstrap root key, in LATCHKEY_DATA_DIR. */
export const BOOTSTRAP_KEY_FILE = "bootstrap-root-key";

/**
 * The bootstrap root key goes to a file only its owner can read (0600), never
 * into the log stream (stdout, where a log shipper would keep it forever). The
 * file is written whole or not at all (temporary file, then rename). Only if it
 * cannot be written is the key printed on stderr, which carries no log lines.
 */
async function handOverBootstrapKey(key: string, file: string, logger: RootLogger): Promise<void> {
  const tmp = `${file}.${process.pid}.tmp`;
  try {
    await mkdir(path.dirname(file), { recursive: true, mode: 0o700 });
    const fh = await open(tmp, "wx", 0o600);
    try {
      await fh.chmod(0o600); // whatever the umask
      await fh.writeFile(`${key}\n`);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, file);
  } catch (err) {
    await rm(tmp, { force: true }).catch(() => undefined);
    logger.error({ err: (err as Error).message, file }, "cannot write the bootstrap root key file; it is printed on stderr instead");
    process.stderr.write(
      `\nBootstrap root key (shown once; it has every permission):\n\n    ${key}\n\n` +
        `Use it as \`authorization: Bearer <key>\`; create narrower keys with \`latchkey root-keys create\`.\n\n`,
    );
    return;
  }
  logger.info({ file }, "bootstrap root key written");
  process.stderr.write(
    `\nA bootstrap root key with every permission was created and written to\n\n    ${file}\n\n` +
      `(readable by this user only). Read it, keep it somewhere safe and delete the file;\n` +
      `create narrower keys with \`latchkey root-keys create\`.\n\n`,
  );
}

/** The only place that reads the environment, listens and wires dependencies. */
export async function main(argv: string[]): Promise<void> {
  let config;
  try {
    config = loadConfig(process.env, argv);
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`latchkey: ${err.message}\n`);
      process.exit(2);
    }
    throw err;
  }
  const logger = createLogger(config.logLevel);
  const store = createServerStore(config, logger);
  try {
    await store.init();
  } catch (err) {
    logger.fatal({ err: (err as Error).message, store: config.store }, "cannot open the store");
    process.exit(1);
  }
  let app;
  try {
    app = createApp({ config, store, logger });
  } catch (err) {
    logger.fatal({ err: (err as Error).message }, "invalid configuration");
    logger.flush();
    process.stderr.write(`latchkey: ${(err as Error).message}\n`);
    process.exit(2);
  }
  let port: number;
  let metricsPort: number | null;
  try {
    ({ port, metricsPort } = await app.start());
  } catch (err) {
    logger.fatal({ err: (err as Error).message, port: config.port, metricsPort: config.metricsPort }, "cannot listen");
    logger.flush();
    process.stderr.write(`latchkey: cannot listen: ${(err as Error).message}\n`);
    process.exit(1);
  }
  // After listening: a fresh install whose port is taken keeps its bootstrap key for the next start.
  const bootstrap = await bootstrapRootKey(store);
  if (bootstrap) await handOverBootstrapKey(bootstrap, path.resolve(config.dataDir, BOOTSTRAP_KEY_FILE), logger);
  logger.info({ port, metricsPort, host: config.host, store: store.kind, tls: !!config.tls }, "latchkey listening");

  let stopping = false;
  const shutdown = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    logger.info({ signal }, "shutting down");
    try {
      await app.stop();
      logger.info("stopped");
      logger.flush();
      process.exit(0);
    } catch (err) {
      logger.error({ err }, "shutdown failed");
      process.exit(1);
    }
  };
  process.on("SIGTERM", () => void shutdown("SIGTERM"));
  process.on("SIGINT", () => void shutdown("SIGINT"));
}

const isEntry = process.argv[1] && import.meta.url === new URL(`file://${process.argv[1]}`).href;
if (isEntry) {
  main(process.argv.slice(2)).catch((err) => {
    process.stderr.write(`latchkey: ${(err as Error).stack ?? err}\n`);
    process.exit(1);
  });
}
