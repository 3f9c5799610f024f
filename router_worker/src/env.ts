/** Bindings, vars and secrets of the router, and the typed configuration read from them. */
import type { Registry } from "./registry";

export interface Env {
  REGISTRY: DurableObjectNamespace<Registry>;
  // vars (wrangler.toml) — all optional here so that a missing var falls back to its default
  ALLOWED_TUNNEL_SUFFIXES?: string;
  DEV_ALLOW_LOOPBACK?: string;
  HEARTBEAT_INTERVAL_S?: string;
  COORDINATOR_TTL_S?: string;
  EVICT_AFTER_S?: string;
  REGISTRY_NAME?: string;
  REGISTRY_LOCATION_HINT?: string;
  SNAPSHOT_TTL_MS?: string;
  UPSTREAM_ATTEMPTS?: string;
  RETRY_BODY_MAX_BYTES?: string;
  UPSTREAM_TIMEOUT_MS?: string;
  RATE_LIMIT_PER_MIN?: string;
  RATE_LIMIT_BURST?: string;
  CORS_ALLOW_ORIGINS?: string;
  CORS_ALLOW_METHODS?: string;
  // secrets (`wrangler secret put`)
  FEDERATION_JOIN_TOKEN?: string;
  ADMIN_TOKEN?: string;
  API_KEYS?: string;
}

export interface Config {
  allowedSuffixes: string[];
  devAllowLoopback: boolean;
  heartbeatIntervalS: number;
  ttlMs: number;
  evictAfterMs: number;
  maxCoordinators: number;
  registryName: string;
  locationHint: string;
  snapshotTtlMs: number;
  upstreamAttempts: number;
  retryBodyMaxBytes: number;
  upstreamTimeoutMs: number;
  rateLimitPerMin: number;
  rateLimitBurst: number;
  corsOrigins: string[];
  corsMethods: string[];
}

function num(value: string | undefined, fallback: number, min: number, max: number): number {
  if (value === undefined || value.trim() === "") return fallback;
  const parsed = Number(value);
  if (!Number.isFinite(parsed)) return fallback;
  return Math.min(max, Math.max(min, parsed));
}

function list(value: string | undefined, fallback: string[]): string[] {
  if (value === undefined) return fallback;
  return value
    .split(",")
    .map((s) => s.trim())
    .filter((s) => s.length > 0);
}

/**
 * The most coordinators the registry holds. Without a join token anyone may register, and one
 * tunnel whose /health answers a new id each time could otherwise grow the registry (rows written,
 * snapshot size, CPU per request) without bound. 1,000 is far above what the free plan sustains.
 */
export const MAX_COORDINATORS = 1000;

const HINTS = new Set(["wnam", "enam", "sam", "weur", "eeur", "apac", "oc", "afr", "me"]);

export function config(env: Env): Config {
  const interval = num(env.HEARTBEAT_INTERVAL_S, 60, 0.05, 3600);
  const ttlS = num(env.COORDINATOR_TTL_S, 3 * interval, 0.05, 86_400);
  const hint = (env.REGISTRY_LOCATION_HINT ?? "weur").trim();
  return {
    allowedSuffixes: list(env.ALLOWED_TUNNEL_SUFFIXES, [".trycloudflare.com"]).map((s) =>
      s.toLowerCase(),
    ),
    devAllowLoopback: (env.DEV_ALLOW_LOOPBACK ?? "false").trim().toLowerCase() === "true",
    heartbeatIntervalS: interval,
    ttlMs: ttlS * 1000,
    evictAfterMs: Math.max(num(env.EVICT_AFTER_S, 300, 0.1, 30 * 86_400), ttlS) * 1000,
    maxCoordinators: MAX_COORDINATORS,
    registryName: (env.REGISTRY_NAME ?? "global").trim() || "global",
    locationHint: HINTS.has(hint) ? hint : "weur",
    snapshotTtlMs: num(env.SNAPSHOT_TTL_MS, 5000, 0, 300_000),
    upstreamAttempts: Math.round(num(env.UPSTREAM_ATTEMPTS, 3, 1, 10)),
    retryBodyMaxBytes: Math.round(num(env.RETRY_BODY_MAX_BYTES, 1 << 20, 0, 8 << 20)),
    upstreamTimeoutMs: num(env.UPSTREAM_TIMEOUT_MS, 10_000, 100, 120_000),
    rateLimitPerMin: num(env.RATE_LIMIT_PER_MIN, 600, 0, 1_000_000),
    rateLimitBurst: Math.max(1, Math.round(num(env.RATE_LIMIT_BURST, 60, 1, 1_000_000))),
    corsOrigins: list(env.CORS_ALLOW_ORIGINS, ["*"]),
    corsMethods: list(env.CORS_ALLOW_METHODS, ["GET", "POST"]).map((m) => m.toUpperCase()),
  };
}
