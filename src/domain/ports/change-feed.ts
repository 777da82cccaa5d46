/** The keys (cached by hash) and identities (cached by id) one write touches. */
export interface ChangeTargets {
  keys: { id: string; hash: string }[];
  identities: string[];
}

/**
 * One entry of the change feed, for cache invalidation across instances
 * (src/cache/invalidation.ts, docs/revocation.md). Seqs increase by one with no
 * gap: seq N is only ever written once N-1 exists, so a reader that finds N+1
 * missing has read everything written before it looked.
 *
 * - `write`: written in the same transaction as the write it describes.
 * - `intent`: written *before* the write it announces (stores without
 *   multi-document transactions). That write lands within `boundMs` of this
 *   record becoming visible, or never; until then, or until the matching
 *   `done`, the targets must not be cached.
 * - `done`: the write announced by the intent `intent` has landed (or failed).
 */
export type Change = ChangeTargets & { seq: number } & (
    | { phase: "write" }
    | { phase: "intent"; boundMs: number }
    | { phase: "done"; intent: number }
  );

/**
 * Every write of a key or identity (by any instance) is recorded in the change
 * feed, written by the stores themselves (see Change).
 */
export interface ChangeFeed {
  /**
   * Returns retained changes with a seq above `afterSeq`, oldest first, at most
   * `limit`. When change `afterSeq + 1` does not exist the answer may be empty
   * even if later ones do (an entry can only be missing if it was pruned or
   * lost), unless `pastGaps` is set.
   */
  changesSince(afterSeq: number, limit: number, opts?: { pastGaps?: boolean }): Promise<Change[]>;
  /** The oldest retained change's seq minus one (the newest seq when none is retained, 0 for an empty feed): where a starting reader begins. */
  changeFeedStart(): Promise<number>;
  /** The newest change's seq (0 when none). */
  lastChangeSeq(): Promise<number>;
  /** Forgets the changes with a seq below `beforeSeq` (never the newest). */
  pruneChanges(beforeSeq: number): Promise<void>;
}
