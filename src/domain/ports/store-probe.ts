/** Whether the store answers (health checks). */
export interface StoreProbe {
  /** Resolves when the store answers; throws UnavailableError otherwise. */
  ping(): Promise<void>;
}
