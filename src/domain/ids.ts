import { randomBytes } from "node:crypto";

const CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz";

/**
 * A sortable id: 10 characters of millisecond time and 16 of randomness in
 * Crockford base32 (the ULID layout, lower case), after a type prefix. Sorting
 * ids sorts by creation time, which is what list pagination relies on.
 */
export function newId(prefix: "id" | "key" | "root", now = Date.now()): string {
  let time = "";
  let t = now;
  for (let i = 0; i < 10; i++) {
    time = CROCKFORD[t % 32] + time;
    t = Math.floor(t / 32);
  }
  const bytes = randomBytes(10);
  let rand = "";
  // 80 random bits -> 16 base32 characters.
  let acc = 0n;
  for (const b of bytes) acc = (acc << 8n) | BigInt(b);
  for (let i = 0; i < 16; i++) {
    rand = CROCKFORD[Number(acc & 31n)] + rand;
    acc >>= 5n;
  }
  return `${prefix}_${time}${rand}`;
}

export const ID_PATTERNS = {
  identity: /^id_[0-9a-hjkmnp-tv-z]{26}$/,
  key: /^key_[0-9a-hjkmnp-tv-z]{26}$/,
  root: /^root_[0-9a-hjkmnp-tv-z]{26}$/,
} as const;
