import { join } from "node:path";
import type { Config } from "../config/config.js";
import { SqliteStore } from "./embedded/sqlite-store.js";
import { MongoStore } from "./mongodb/mongo-store.js";
import type { Store } from "./store.js";

/** The store the configuration selects (not yet initialised). */
export function createStore(config: Config): Store {
  if (config.store === "mongodb") {
    return new MongoStore({ uri: config.mongodbUri!, database: config.mongodbDatabase });
  }
  return new SqliteStore(join(config.dataDir, "latchkey.db"));
}
