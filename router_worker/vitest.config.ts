import { cloudflareTest } from "@cloudflare/vitest-pool-workers";
import { defineConfig } from "vitest/config";

// Tests run inside workerd with the bindings of wrangler.toml, dev loopback allowed and short
// timings; each test names its own registry (REGISTRY_NAME) so that tests never share state.
export default defineConfig({
  plugins: [
    cloudflareTest({
      main: "./src/index.ts",
      wrangler: { configPath: "./wrangler.toml" },
      miniflare: {
        bindings: {
          DEV_ALLOW_LOOPBACK: "true",
          HEARTBEAT_INTERVAL_S: "10",
          EVICT_AFTER_S: "120",
        },
      },
    }),
  ],
  server: { fs: { allow: [".."] } },
  test: {
    include: ["test/**/*.test.ts"],
    benchmark: { include: ["bench/**/*.bench.ts"] },
    testTimeout: 20_000,
  },
});
