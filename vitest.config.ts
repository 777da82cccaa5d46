import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    // Reaps server processes an interrupted integration test left behind.
    globalSetup: ["test/integration/global-setup.ts"],
    testTimeout: 30_000,
    hookTimeout: 60_000,
    // Integration tests start servers and external tools; keep the 2-core machine calm.
    maxWorkers: 2,
  },
});
