import { AlreadyExistsError } from "../../domain/errors.js";
import type { RootKeyRecord } from "../../domain/types.js";
import { fromRootKeyDoc } from "./documents.js";
import type { MongoContext } from "./context.js";

/** Root keys, and the one-time bootstrap of the first (in `settings`). */
export class MongoRootKeys {
  constructor(private readonly ctx: MongoContext) {}

  /**
   * Bucketed layout: the pointer `{_id: hash}` first, which refuses a taken
   * hash; then the root key (its unique hash index holds on both layouts). A
   * pointer left without its root key (a crash between) finds nothing.
   */
  async createRootKey(rec: RootKeyRecord): Promise<void> {
    const { id, ...rest } = rec;
    await this.ctx.run(async () => {
      if (this.ctx.layout === "bucketed") await this.ctx.rootKeyHashes.insertOne({ _id: rec.hash, rootKeyId: id });
      try {
        await this.ctx.rootKeys.insertOne({ _id: id, ...rest });
      } catch (err) {
        if (this.ctx.layout === "bucketed") await this.ctx.rootKeyHashes.deleteOne({ _id: rec.hash }).catch(() => undefined);
        throw err;
      }
    });
  }

  /** Indexed layout: the unique hash index. Bucketed: two `_id` lookups (pointer, root key) in small collections. */
  async getRootKeyByHash(hash: string): Promise<RootKeyRecord | null> {
    const d = await this.ctx.run(async () => {
      if (this.ctx.layout === "indexed") return this.ctx.rootKeys.findOne({ hash });
      const p = await this.ctx.rootKeyHashes.findOne({ _id: hash });
      const r = p ? await this.ctx.rootKeys.findOne({ _id: p.rootKeyId }) : null;
      return r?.hash === hash ? r : null;
    });
    return d ? fromRootKeyDoc(d) : null;
  }

  async listRootKeys(): Promise<RootKeyRecord[]> {
    const docs = await this.ctx.run(() => this.ctx.rootKeys.find({}).sort({ _id: 1 }).toArray());
    return docs.map(fromRootKeyDoc);
  }

  async deleteRootKey(id: string): Promise<boolean> {
    return this.ctx.run(async () => {
      const d = await this.ctx.rootKeys.findOneAndDelete({ _id: id });
      if (!d) return false;
      if (this.ctx.layout === "bucketed" && (await this.ctx.rootKeyHashes.findOne({ _id: d.hash }))?.rootKeyId === id) {
        await this.ctx.rootKeyHashes.deleteOne({ _id: d.hash });
      }
      return true;
    });
  }

  async createFirstRootKey(rec: RootKeyRecord): Promise<boolean> {
    try {
      await this.ctx.run(() => this.ctx.settings.insertOne({ _id: "bootstrapped", value: String(rec.createdAt) }));
    } catch (err) {
      if (err instanceof AlreadyExistsError) return false;
      throw err;
    }
    try {
      await this.createRootKey(rec);
      return true;
    } catch (err) {
      await this.ctx.settings.deleteOne({ _id: "bootstrapped" }).catch(() => undefined);
      throw err;
    }
  }
}
