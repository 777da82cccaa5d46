import { AlreadyExistsError, UnavailableError } from "../../domain/errors.js";
import type { IdentityPatch, IdentityRecord } from "../../domain/types.js";
import type { PageQuery } from "../store.js";
import { FENCE } from "./lease-lock.js";
import { fromIdentityDoc, identityTargets, keyTargets, setOf, toIdentityDoc } from "./documents.js";
import type { MongoKeyRefs } from "./key-refs.js";
import type { MongoContext } from "./context.js";

/** Keys per change record when one operation touches many (DeleteIdentity). */
const TARGETS_PER_CHANGE = 500;
/** Keys per change record when each is written under its own lock (unlinking keys from a deleted identity). */
const LOCKED_TARGETS_PER_CHANGE = 50;

function escapeRegex(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\\-]/g, "\\$&");
}

/** Identities; deleting one deletes or unlinks its keys first. */
export class MongoIdentities {
  constructor(
    private readonly ctx: MongoContext,
    private readonly keyRefs: MongoKeyRefs,
  ) {}

  async createIdentity(rec: IdentityRecord): Promise<void> {
    await this.ctx.run(() => this.ctx.identities.insertOne(toIdentityDoc(rec)));
  }

  async ensureIdentity(rec: IdentityRecord): Promise<{ identity: IdentityRecord; created: boolean }> {
    for (let attempt = 0; attempt < 3; attempt++) {
      const existing = await this.getIdentityByExternalId(rec.externalId);
      if (existing) return { identity: existing, created: false };
      try {
        await this.createIdentity(rec);
        return { identity: rec, created: true };
      } catch (err) {
        // Lost a race with a concurrent create: read the winner.
        if (!(err instanceof AlreadyExistsError)) throw err;
      }
    }
    throw new UnavailableError("could not create or read the identity; retry");
  }

  async getIdentity(id: string): Promise<IdentityRecord | null> {
    const d = await this.ctx.run(() => this.ctx.identities.findOne({ _id: id }));
    return d ? fromIdentityDoc(d) : null;
  }

  async getIdentityByExternalId(externalId: string): Promise<IdentityRecord | null> {
    const d = await this.ctx.run(() => this.ctx.identities.findOne({ externalId }));
    return d ? fromIdentityDoc(d) : null;
  }

  async getIdentities(ids: string[]): Promise<IdentityRecord[]> {
    if (ids.length === 0) return [];
    const docs = await this.ctx.run(() => this.ctx.identities.find({ _id: { $in: ids } }).toArray());
    return docs.map(fromIdentityDoc);
  }

  async listIdentities(page: PageQuery, search: string | null): Promise<IdentityRecord[]> {
    const filter: Record<string, unknown> = { _id: { $gt: page.afterId ?? "" } };
    if (search !== null) filter.externalId = { $regex: escapeRegex(search), $options: "i" };
    const docs = await this.ctx.run(() => this.ctx.identities.find(filter).sort({ _id: 1 }).limit(page.limit).toArray());
    return docs.map(fromIdentityDoc);
  }

  async updateIdentity(id: string, patch: IdentityPatch, now: number): Promise<IdentityRecord | null> {
    const d = await this.ctx.run(() =>
      this.ctx.locked(`identity:${id}`, async () => {
        if (!(await this.ctx.identities.findOne({ _id: id }, { projection: { _id: 1 } }))) return null;
        return this.ctx.changing(identityTargets(id), (o) =>
          this.ctx.identities.findOneAndUpdate({ _id: id }, { $set: setOf(patch, now), $inc: { version: 1, [FENCE]: 1 } }, { returnDocument: "after", ...o }),
        );
      }),
    );
    return d ? fromIdentityDoc(d) : null;
  }

  async deleteIdentity(id: string, deleteKeys: boolean): Promise<{ deletedKeys: number; unlinkedKeys: number } | null> {
    return this.ctx.run(async () => {
      if (!(await this.ctx.identities.findOne({ _id: id }, { projection: { _id: 1 } }))) return null;
      // Keys first: a failure half-way leaves an identity with fewer keys, never keys
      // pointing at a deleted identity. Rounds, so that keys linked meanwhile go too;
      // one change entry (intent and done) per batch of keys, not per key.
      let deletedKeys = 0;
      let unlinkedKeys = 0;
      for (let round = 0; round < 10; round++) {
        const affected = await this.keyRefs.findKeys({ identityId: id });
        if (affected.length === 0) break;
        const targetsOf = (batch: typeof affected) => keyTargets(...batch);
        if (deleteKeys) {
          for (let i = 0; i < affected.length; i += TARGETS_PER_CHANGE) {
            const batch = affected.slice(i, i + TARGETS_PER_CHANGE);
            deletedKeys += await this.ctx.changing(targetsOf(batch), (o) => this.keyRefs.deleteKeyDocs(batch, { identityId: id }, o));
            await this.keyRefs.dropKeyPointers(batch);
          }
          continue;
        }
        // Each key under its own lock: a batch ends early when its intent's time is up, and the rest go in the next.
        for (let rest = affected; rest.length > 0; ) {
          const batch = rest.slice(0, LOCKED_TARGETS_PER_CHANGE);
          let written = 0;
          await this.ctx.changing(targetsOf(batch), async (_o, inTime) => {
            for (const k of batch) {
              if (!inTime()) break;
              const ref = this.keyRefs.keyRefOf(k);
              const res = await this.ctx.locked(`key:${k.id}`, () =>
                ref.coll.updateOne({ _id: ref._id, identityId: id }, { $set: { identityId: null, updatedAt: Date.now() }, $inc: { version: 1, [FENCE]: 1 } }),
              );
              unlinkedKeys += res.modifiedCount;
              written++;
            }
          });
          if (written === 0) throw new UnavailableError("unlinking the identity's keys is too slow; retry");
          rest = rest.slice(written);
        }
      }
      const res = await this.ctx.changing(identityTargets(id), (o) => this.ctx.identities.deleteOne({ _id: id }, o));
      return res.deletedCount === 1 ? { deletedKeys, unlinkedKeys } : null;
    });
  }

  /** For seeding a database no instance serves yet: identities in bulk (see loadKeys). */
  async loadIdentities(records: IdentityRecord[]): Promise<void> {
    await this.ctx.run(async () => {
      for (let i = 0; i < records.length; i += 1000) await this.ctx.identities.insertMany(records.slice(i, i + 1000).map(toIdentityDoc));
    });
  }
}
