import type { Collection } from "mongodb";
import type { Change, ChangeTargets } from "../store.js";
import type { Credits, IdentityPatch, IdentityRecord, JsonObject, KeyPatch, KeyRecord, RootKeyRecord } from "../../domain/types.js";
import type { Counts } from "../../domain/usage.js";
import { FENCE } from "./lease-lock.js";

/*
 * Documents mirror the domain records with `_id` for the id. `meta` is stored
 * as a JSON string: it is never queried, and a string cannot carry `$` or dotted
 * field names into the database. Every filter the store's parts build is made
 * of typed values (strings checked against the input patterns, numbers), never
 * of a caller's object, so no request can inject a query operator.
 */
/**
 * `_fence`: the document's write counter, checked by fenced writes (see
 * lease-lock.ts). `creditsSeq`: the credit ledger's sequence number of the
 * balance last written here (src/storage/redis-credits.ts).
 */
export type StoreFields = { [FENCE]?: number; creditsSeq?: number };
export type IdentityDoc = Omit<IdentityRecord, "id" | "meta"> & { _id: string; meta: string } & StoreFields;
/**
 * A key. Indexed layout: `_id` is the key id. Bucketed layout (ferretdb.ts):
 * `_id` is the hash and `keyId` the key id.
 */
export type KeyDoc = Omit<KeyRecord, "id" | "meta" | SlimKeyField> & { _id: string; keyId?: string; meta: string } & Partial<Pick<KeyRecord, SlimKeyField>> & StoreFields;
/**
 * Fields a bucketed key document leaves out when they say nothing (see
 * toBucketedKeyDoc): the hash (it is the `_id`), the last-used time (kept in
 * `key_last_used`), and an empty expiry, balance or rate-limit list.
 */
type SlimKeyField = "hash" | "expiresAt" | "credits" | "ratelimits" | "lastUsedAt";
/** Bucketed layout: how a key is found by id, and when it was last used. */
export type KeyIdDoc = { _id: string; hash: string; lastUsedAt?: number };
export type RootKeyDoc = Omit<RootKeyRecord, "id"> & { _id: string };
/** Bucketed layout: how a root key is found by hash. */
export type RootKeyHashDoc = { _id: string; rootKeyId: string };
/** Where a key's document is: its collection and `_id` (the key id, or on the bucketed layout its hash). */
export interface KeyRef {
  coll: Collection<KeyDoc>;
  _id: string;
  id: string;
}
export type SettingDoc = { _id: string; value: string };
/** A version of a usage row (usage.ts): `r` the row id, `s` its writer slot, `seq` the roll-up that wrote it; rows from before versions have neither `r` nor `s` (`_id` is the row id). */
export type UsageDoc = { _id: string; r?: string; s?: string; g: string; b: number; k: string; i: string | null; tag: string; seq: number; data?: undefined } & Counts;
/** One row of a usage log document: granularity, bucket, key, identity, tag, and the counters in COUNTERS order (FerretDB 1.x stores no arrays of arrays). */
export type UsageLogRow = { g: string; b: number; k: string; i: string | null; t: string; n: number[] };
/** A row inside a usage pack: key, identity, tag, counters (the pack's granularity and bucket are the document's). */
export type UsagePackRow = { k: string; i: string | null; t: string; n: number[] };
/**
 * Rows of one writer slot in one bucket of one granularity as a roll-up wrote
 * them (usage.ts): `<slot>|<g>|<b>#<seq>|<n>|<digest of the content>`, up to a
 * few hundred rows a document, sorted by identity, key and tag. `data` holds the
 * rows as JSON text (UsagePackRow[]); `i` and `k` list their identities and keys
 * (a read by identity or key finds the packs holding one of its rows through the
 * same `(i|k, g, b)` indexes as single-row versions).
 */
export type UsagePackDoc = { _id: string; s: string; g: string; b: number; seq: number; i: string[]; k: string[]; data: string };
/**
 * A flush of usage counts as written (usage_log): rows of one batch of one
 * writer slot, applied to the rows by a roll-up (usage.ts). `data` holds the
 * rows as JSON text (one string: FerretDB stores, scans and returns it without
 * taking each row apart); `i` and `k` list the batch's identities and keys, so
 * a read by identity or key finds the documents that hold one of its rows.
 * Documents from before `data` hold `rows`.
 */
/**
 * A usage log document. `m: 1`: its rows are minute rows, whose hour and day rows
 * the readers derive (usage.ts, logRows); documents without it (earlier releases)
 * hold every granularity's rows.
 */
export type UsageLogDoc = { _id: string; slot: string; seq: number; m?: 1; data?: string; i?: string[]; k?: string[]; rows?: UsageLogRow[] };
export type ActivityDoc = { _id: string; lastUsedAt: number };
/** Bucketed layout: the last-used times of the keys of one id bucket (keys.ts), `t.<key id>` in ms. */
export type LastUsedDoc = { _id: string; t: Record<string, number> };
/**
 * The document holding a balance, as the credit methods read it (readCredits in
 * credits.ts fills in what a slim key document leaves out: no balance, its hash).
 */
export type CreditsDoc = { _id: string; keyId?: string; credits: Credits | null; hash?: string; creditsKeyId?: string | null } & StoreFields;

/**
 * One entry of the change feed (see Change in ../store.ts and docs/revocation.md).
 * `_id` is the seq as a zero-padded string: FerretDB 1.x pushes down only
 * `_id` equality on strings (a number `_id` is a scan in Go), and on MongoDB the
 * `_id` index orders it. Entries live in collections of `feedBucket` seqs each
 * (`change_feed_<seq / feedBucket>`; how many, and why: feedBucketSize in
 * ferretdb.ts).
 */
export type FeedEntry = ChangeTargets & ({ phase: "intent"; boundMs: number } | { phase: "done"; intent: number });
export type FeedDoc = FeedEntry & { _id: string; seq: number; at: number };
export const seqId = (seq: number) => String(seq).padStart(16, "0");
/** The stored form of change feed entry `seq` (exported for writing history in bulk in the benchmark). */
export function toFeedDoc(seq: number, entry: FeedEntry, at = Date.now()): FeedDoc {
  return { _id: seqId(seq), seq, at, ...entry } as FeedDoc;
}

export const keyTargets = (...keys: { id: string; hash: string }[]): ChangeTargets => ({ keys: keys.map((k) => ({ id: k.id, hash: k.hash })), identities: [] });
export const identityTargets = (id: string): ChangeTargets => ({ keys: [], identities: [id] });

/** The stored form of an identity (exported for bulk seeding in the benchmark). */
export function toIdentityDoc(r: IdentityRecord): IdentityDoc {
  const { id, meta, ...rest } = r;
  return { _id: id, meta: JSON.stringify(meta), ...rest };
}
export function fromIdentityDoc(d: IdentityDoc): IdentityRecord {
  const { _id, meta, [FENCE]: _fence, creditsSeq: _seq, ...rest } = d;
  return { id: _id, meta: JSON.parse(meta) as JsonObject, ...rest };
}
/**
 * The stored form of a key in the indexed layout (`_id` = its id) — also the
 * form every earlier version wrote. MongoKeys.loadKeys writes keys in bulk in
 * the database's layout.
 */
export function toKeyDoc(r: KeyRecord): KeyDoc {
  const { id, meta, ...rest } = r;
  return { _id: id, meta: JSON.stringify(meta), ...rest };
}
/**
 * The stored form of a key in the bucketed layout: `_id` = its hash, `keyId` =
 * its id, without the fields SlimKeyField names when they are empty — FerretDB
 * parses every document of a bucket for each `_id` lookup, so a cold
 * verification costs it less the smaller they are (docs/performance.md, step
 * 8g). Documents written before hold them all; fromKeyDoc reads both.
 */
export function toBucketedKeyDoc(r: KeyRecord): KeyDoc {
  const { id, hash, meta, lastUsedAt: _lastUsed, expiresAt, credits, ratelimits, ...rest } = r;
  const d: KeyDoc = { _id: hash, keyId: id, meta: JSON.stringify(meta), ...rest };
  if (expiresAt !== null) d.expiresAt = expiresAt;
  if (credits !== null) d.credits = credits;
  if (ratelimits.length > 0) d.ratelimits = ratelimits;
  return d;
}
/** A key document with the fields a slim one leaves out filled in. */
export type FullKeyDoc = KeyDoc & Pick<KeyRecord, SlimKeyField>;
/** `d` with the fields toBucketedKeyDoc leaves out filled in (the hash is the `_id` there). */
export function fullKeyDoc(d: KeyDoc): FullKeyDoc {
  return { ...d, hash: d.hash ?? d._id, expiresAt: d.expiresAt ?? null, credits: d.credits ?? null, ratelimits: d.ratelimits ?? [], lastUsedAt: d.lastUsedAt ?? null };
}
export function fromKeyDoc(d: KeyDoc): KeyRecord {
  const { _id, keyId, meta, [FENCE]: _fence, creditsSeq: _seq, ...rest } = fullKeyDoc(d);
  return { id: keyId ?? _id, meta: JSON.parse(meta) as JsonObject, ...rest };
}
export function fromFeedDoc(d: FeedDoc): Change {
  const base = { seq: d.seq, keys: d.keys, identities: d.identities };
  return d.phase === "intent" ? { ...base, phase: "intent", boundMs: d.boundMs } : { ...base, phase: "done", intent: d.intent };
}
export function fromRootKeyDoc(d: RootKeyDoc): RootKeyRecord {
  const { _id, ...rest } = d;
  return { id: _id, ...rest };
}

/** `$set` for a patch: meta as a JSON string, other fields as they are. */
export function setOf(patch: IdentityPatch | KeyPatch, now: number): Record<string, unknown> {
  const set: Record<string, unknown> = { updatedAt: now };
  for (const [k, v] of Object.entries(patch)) {
    if (v === undefined) continue;
    set[k] = k === "meta" ? JSON.stringify(v) : v;
  }
  return set;
}
