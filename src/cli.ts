#!/usr/bin/env node
import { ConfigError, loadConfig } from "./config/config.js";
import { formatRootPermission, parseRootPermission } from "./domain/access.js";
import { createRootKey } from "./domain/root-keys.js";
import { main as serve } from "./main.js";
import { createStore } from "./app/stores.js";

const USAGE = `usage:
  latchkey [serve] [--port N ...]          start the server (flags mirror the environment variables)
  latchkey root-keys create --name NAME --permission PERM [--permission PERM ...]
                                           PERM: read | write | verify | usage | * , optionally :API_ID
  latchkey root-keys list
  latchkey root-keys revoke ROOT_KEY_ID

The store is chosen by the same environment as the server (LATCHKEY_STORE,
LATCHKEY_DATA_DIR, MONGODB_URI, ...).`;

function fail(msg: string): never {
  process.stderr.write(`latchkey: ${msg}\n\n${USAGE}\n`);
  process.exit(2);
}

function options(args: string[]): Map<string, string[]> {
  const out = new Map<string, string[]>();
  for (let i = 0; i < args.length; i++) {
    const [flag, inline] = args[i].split(/=(.*)/s, 2);
    if (!flag.startsWith("--")) fail(`unexpected argument ${args[i]}`);
    const value = inline ?? args[++i];
    if (value === undefined) fail(`${flag} needs a value`);
    out.set(flag, [...(out.get(flag) ?? []), value]);
  }
  return out;
}

async function rootKeys(args: string[]): Promise<void> {
  let config;
  try {
    config = loadConfig(process.env, []);
  } catch (err) {
    if (err instanceof ConfigError) fail(err.message);
    throw err;
  }
  const store = createStore(config);
  await store.init();
  try {
    const [cmd, ...rest] = args;
    if (cmd === "create") {
      const opts = options(rest);
      const name = opts.get("--name")?.[0] ?? fail("--name is required");
      if (!/^[\w .:-]{1,128}$/.test(name)) fail("--name must be 1-128 letters, digits, spaces and _ . : -");
      const perms = (opts.get("--permission") ?? opts.get("--permissions") ?? fail("at least one --permission is required")).flatMap((p) =>
        p.split(","),
      );
      let parsed;
      try {
        parsed = perms.flatMap(parseRootPermission);
      } catch (err) {
        fail((err as Error).message);
      }
      const res = await createRootKey(store, name, parsed);
      process.stdout.write(
        JSON.stringify({ id: res!.record.id, name, permissions: parsed.map(formatRootPermission), key: res!.plaintext }) + "\n",
      );
    } else if (cmd === "list") {
      for (const k of await store.listRootKeys()) {
        process.stdout.write(
          JSON.stringify({ id: k.id, name: k.name, start: k.start, permissions: k.permissions.map(formatRootPermission), createdAt: new Date(k.createdAt).toISOString() }) + "\n",
        );
      }
    } else if (cmd === "revoke") {
      const id = rest[0] ?? fail("revoke needs a root key id");
      if (!(await store.deleteRootKey(id))) {
        process.stderr.write(`latchkey: no root key ${id}\n`);
        process.exitCode = 1;
      } else {
        process.stdout.write(`revoked ${id}\n`);
      }
    } else {
      fail(`unknown root-keys command ${cmd ?? ""}`);
    }
  } finally {
    await store.close();
  }
}

const [command, ...args] = process.argv.slice(2);
if (command === "root-keys") {
  rootKeys(args).catch((err) => {
    process.stderr.write(`latchkey: ${(err as Error).message}\n`);
    process.exit(1);
  });
} else if (command === "help" || command === "--help" || command === "-h") {
  process.stdout.write(USAGE + "\n");
} else {
  void serve(command === "serve" ? args : process.argv.slice(2));
}
