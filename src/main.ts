#!/usr/bin/env node
import { ConfigError, loadConfig } from "./config/config.js";
import { bootstrapRootKey, createApp } from "./server/app.js";
import { createLogger } from "./server/logger.js";
import { createServerStore } from "./storage/create-store.js";

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
  if (bootstrap) {
    // Printed once, on the first start of a fresh install; only its hash is kept.
    process.stdout.write(
      `\nBootstrap root key (shown once; it has every permission):\n\n    ${bootstrap}\n\n` +
        `Use it as \`authorization: Bearer <key>\`; create narrower keys with \`latchkey root-keys create\`.\n\n`,
    );
  }
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
