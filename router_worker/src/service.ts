/** Public requests: ANY /service/{name}/{path} to the nearest healthy coordinator offering `name`. */
import { apiKeyHashes, clientIp, corsHeaders, matchApiKey, preflight, presentedApiKey, RateLimiter } from "./auth";
import type { Config, Env } from "./env";
import { jsonError } from "./errors";
import { locationFromCf, rank } from "./geo";
import { exhausted, forward, forwardHeaders, prepareBody, requestId, RETRY_STATUSES } from "./proxy";
import { SERVICE_PATTERN } from "./schemas";
import { coordinators, localFailureMap, noteFailure, registry } from "./snapshot";

export const limiter = new RateLimiter();
/** At most one failure report per coordinator per this many ms, per isolate (DO requests cost). */
const REPORT_EVERY_MS = 5000;
const reported = new Map<string, number>();

export function reportFailure(env: Env, cfg: Config, ctx: ExecutionContext, id: string): void {
  const now = Date.now();
  noteFailure(id, now);
  const last = reported.get(id) ?? 0;
  if (now - last < REPORT_EVERY_MS) return;
  reported.set(id, now);
  ctx.waitUntil(registry(env, cfg).reportFailure(id).catch(() => undefined));
}

export function resetReports(): void {
  reported.clear();
}

function decorate(response: Response, rid: string, cors: Record<string, string> | null, coordinator?: string): Response {
  const out = new Response(response.body, response);
  out.headers.set("X-Request-Id", rid);
  if (coordinator !== undefined) out.headers.set("X-Rma-Coordinator", coordinator);
  if (cors !== null) for (const [k, v] of Object.entries(cors)) out.headers.set(k, v);
  return out;
}

export async function service(
  request: Request,
  env: Env,
  cfg: Config,
  ctx: ExecutionContext,
  name: string,
): Promise<Response> {
  const rid = requestId(request);
  const cors = corsHeaders(request, cfg);
  const answer = (r: Response): Response => decorate(r, rid, cors);
  if (request.method === "OPTIONS" && request.headers.get("Access-Control-Request-Method") !== null) {
    const pre = preflight(request, cfg);
    if (pre !== null) return pre;
  }
  if (!SERVICE_PATTERN.test(name)) {
    return answer(jsonError(400, "invalid_service", `service names match ${SERVICE_PATTERN.source}`));
  }
  const hashes = apiKeyHashes(env.API_KEYS);
  let client = `ip:${clientIp(request)}`;
  const strip: string[] = [];
  if (hashes.length > 0) {
    const key = await matchApiKey(presentedApiKey(request), hashes);
    if (key === null) {
      return answer(jsonError(401, "unauthorized", "this router needs an API key (Authorization: Bearer <key> or X-API-Key)", { "WWW-Authenticate": "Bearer" }));
    }
    client = `key:${key}`;
    strip.push("authorization", "x-api-key"); // the key is the router's, never forwarded
  }
  const wait = limiter.take(client, cfg.rateLimitPerMin, cfg.rateLimitBurst, Date.now());
  if (wait > 0) {
    return answer(jsonError(429, "rate_limited", `too many requests; retry in ${wait} s`, { "Retry-After": String(wait) }));
  }

  const now = Date.now();
  const all = await coordinators(env, cfg, ctx);
  const where = locationFromCf(request.cf);
  const select = { now, ttlMs: cfg.ttlMs, localFailures: localFailureMap(now) };
  const candidates = rank(all, where, { ...select, service: name });
  if (candidates.length > 0) {
    // The snapshot lags the federation by up to a heartbeat: right after a failover the workers
    // of a dead coordinator already serve `name` elsewhere. When every coordinator known to have
    // it fails, the other healthy ones are tried next (they answer 503 fast when they lack it).
    const offering = new Set(candidates.map((c) => c.id));
    for (const c of rank(all, where, select)) if (!offering.has(c.id)) candidates.push(c);
  }
  if (candidates.length === 0) {
    return answer(jsonError(503, "no_coordinator", `no healthy coordinator offers service ${JSON.stringify(name)}`, { "Retry-After": "5" }));
  }
  const url = new URL(request.url);
  const pathAndQuery = url.pathname + url.search;
  const websocket = (request.headers.get("Upgrade") ?? "").toLowerCase() === "websocket";
  const headers = forwardHeaders(request, rid, { keepUpgrade: websocket, strip });
  if (websocket) {
    // Passed through unchanged: one attempt, the 101 and its socket returned as they are.
    const target = candidates[0];
    if (target === undefined) return answer(jsonError(503, "no_coordinator", null));
    try {
      // redirect: "manual" — the router fetches registered coordinator URLs only, never a Location.
      const upgraded = await fetch(target.url + pathAndQuery, { method: request.method, headers, redirect: "manual" });
      if (RETRY_STATUSES.has(upgraded.status)) reportFailure(env, cfg, ctx, target.id); // passive health
      return upgraded;
    } catch (err) {
      reportFailure(env, cfg, ctx, target.id);
      return answer(jsonError(502, "upstream_unavailable", { attempts: [{ coordinator_id: target.id, error: String(err) }] }));
    }
  }
  const body = await prepareBody(request, cfg.retryBodyMaxBytes);
  const result = await forward(candidates, {
    method: request.method,
    pathAndQuery,
    headers,
    body,
    timeoutMs: 0,
    attempts: cfg.upstreamAttempts,
    onFailure: (c) => reportFailure(env, cfg, ctx, c.id),
  });
  if (!result.ok) return answer(await exhausted(result, `service ${JSON.stringify(name)}`));
  return decorate(result.response, rid, cors, result.coordinator.id);
}
