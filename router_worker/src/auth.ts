/** Secrets, API keys, the per-client rate limit and CORS. Secrets are never logged. */
import type { Config } from "./env";

const encoder = new TextEncoder();

export async function sha256Hex(value: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", encoder.encode(value));
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** Constant-time equality of two strings of any length (compared through their SHA-256). */
export async function secretEquals(presented: string, expected: string): Promise<boolean> {
  const [a, b] = await Promise.all([
    crypto.subtle.digest("SHA-256", encoder.encode(presented)),
    crypto.subtle.digest("SHA-256", encoder.encode(expected)),
  ]);
  return crypto.subtle.timingSafeEqual(a, b);
}

/** Constant-time equality of two hex digests. */
export function hexEquals(a: string, b: string): boolean {
  const x = encoder.encode(a);
  const y = encoder.encode(b);
  if (x.byteLength !== y.byteLength) return false;
  return crypto.subtle.timingSafeEqual(x, y);
}

export function bearer(request: Request): string | null {
  const value = request.headers.get("Authorization");
  if (value === null) return null;
  const m = /^Bearer\s+(\S+)\s*$/i.exec(value);
  return m ? (m[1] ?? null) : null;
}

export function newSecret(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(32));
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** `API_KEYS`: comma-separated SHA-256 hex digests of the accepted keys (`sha256:` optional). */
export function apiKeyHashes(raw: string | undefined): string[] {
  if (raw === undefined) return [];
  return raw
    .split(",")
    .map((s) => s.trim().toLowerCase().replace(/^sha256:/, ""))
    .filter((s) => /^[0-9a-f]{64}$/.test(s));
}

/** The API key a client presented (`Authorization: Bearer`, else `X-API-Key`). */
export function presentedApiKey(request: Request): string | null {
  return bearer(request) ?? request.headers.get("X-API-Key");
}

/** The hash of the matching key, or null. Every configured hash is compared. */
export async function matchApiKey(presented: string | null, hashes: string[]): Promise<string | null> {
  if (presented === null || presented.length === 0 || presented.length > 512) return null;
  const h = await sha256Hex(presented);
  let found: string | null = null;
  for (const candidate of hashes) if (hexEquals(h, candidate)) found = candidate;
  return found;
}

/** Token buckets per client, per isolate (free: no Durable Object request per public call). */
export class RateLimiter {
  private readonly buckets = new Map<string, { tokens: number; at: number }>();
  constructor(private readonly maxClients = 10_000) {}

  /** 0 when allowed, else the seconds to wait. */
  take(client: string, perMin: number, burst: number, now: number): number {
    if (perMin <= 0) return 0;
    const rate = perMin / 60_000; // tokens per ms
    let b = this.buckets.get(client);
    if (b === undefined) {
      if (this.buckets.size >= this.maxClients) {
        const oldest = this.buckets.keys().next().value;
        if (oldest !== undefined) this.buckets.delete(oldest);
      }
      b = { tokens: burst, at: now };
      this.buckets.set(client, b);
    } else {
      b.tokens = Math.min(burst, b.tokens + (now - b.at) * rate);
      b.at = now;
    }
    if (b.tokens >= 1) {
      b.tokens -= 1;
      return 0;
    }
    return Math.max(1, Math.ceil((1 - b.tokens) / rate / 1000));
  }

  clear(): void {
    this.buckets.clear();
  }
}

export function clientIp(request: Request): string {
  return request.headers.get("CF-Connecting-IP") ?? "unknown";
}

/** CORS headers for `origin`, or null when CORS does not apply. */
export function corsHeaders(request: Request, cfg: Config): Record<string, string> | null {
  const origin = request.headers.get("Origin");
  if (origin === null || cfg.corsOrigins.length === 0) return null;
  const any = cfg.corsOrigins.includes("*");
  if (!any && !cfg.corsOrigins.includes(origin)) return null;
  return {
    "Access-Control-Allow-Origin": any ? "*" : origin,
    "Access-Control-Expose-Headers": "X-Request-Id, Retry-After, X-Rma-Coordinator",
    ...(any ? {} : { Vary: "Origin" }),
  };
}

export function preflight(request: Request, cfg: Config): Response | null {
  const base = corsHeaders(request, cfg);
  const method = (request.headers.get("Access-Control-Request-Method") ?? "").toUpperCase();
  if (base === null || !cfg.corsMethods.includes(method)) return null;
  return new Response(null, {
    status: 204,
    headers: {
      ...base,
      "Access-Control-Allow-Methods": [...cfg.corsMethods, "OPTIONS"].join(", "),
      "Access-Control-Allow-Headers":
        "Content-Type, Authorization, X-API-Key, X-Request-Id, Accept, Cache-Control",
      "Access-Control-Max-Age": "600",
    },
  });
}
