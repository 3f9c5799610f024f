/** Compute workers through the router: POST /api/worker/register and POST /api/worker/heartbeat. */
import type { Config, Env } from "./env";
import { jsonError } from "./errors";
import { locationFromCf, rank } from "./geo";
import { exhausted, forward, forwardHeaders, requestId } from "./proxy";
import {
  MAX_CONTROL_BODY,
  parseBody,
  readCapped,
  type WorkerHeartbeatRequest,
  type WorkerRegisterRequest,
} from "./schemas";
import { coordinators, localFailureMap } from "./snapshot";
import { reportFailure } from "./service";

function withRequestId(response: Response, rid: string): Response {
  const out = new Response(response.body, response);
  out.headers.set("X-Request-Id", rid);
  return out;
}

/** Forwarded to the nearest healthy coordinator; on failure, the next nearest. */
export async function register(request: Request, env: Env, cfg: Config, ctx: ExecutionContext): Promise<Response> {
  const raw = await readCapped(request, MAX_CONTROL_BODY);
  parseBody<WorkerRegisterRequest>(raw, "workerRegister");
  const now = Date.now();
  const all = await coordinators(env, cfg, ctx);
  const candidates = rank(all, locationFromCf(request.cf), { now, ttlMs: cfg.ttlMs, localFailures: localFailureMap(now) });
  if (candidates.length === 0) {
    return jsonError(503, "no_coordinator", "no healthy coordinator is registered; retry later", { "Retry-After": "5" });
  }
  const rid = requestId(request);
  const headers = forwardHeaders(request, rid);
  headers.set("Content-Type", "application/json");
  const result = await forward(candidates, {
    method: "POST",
    pathAndQuery: "/api/worker/register",
    headers,
    body: { kind: "buffered", bytes: raw.slice().buffer },
    timeoutMs: cfg.upstreamTimeoutMs,
    attempts: cfg.upstreamAttempts,
    onFailure: (c) => reportFailure(env, cfg, ctx, c.id),
  });
  if (!result.ok) return exhausted(result, "the worker registration");
  return withRequestId(result.response, rid);
}

/** Routed to the coordinator named by `coordinator_id`; 404 (register again) when it is gone. */
export async function heartbeat(request: Request, env: Env, cfg: Config, ctx: ExecutionContext): Promise<Response> {
  const raw = await readCapped(request, MAX_CONTROL_BODY);
  const beat = parseBody<WorkerHeartbeatRequest>(raw, "workerHeartbeat");
  if (beat.coordinator_id === undefined || beat.coordinator_id === null) {
    return jsonError(404, "unknown_worker", "a heartbeat through the router names its coordinator_id; register again");
  }
  const all = await coordinators(env, cfg, ctx);
  const target = all.find((c) => c.id === beat.coordinator_id);
  if (target === undefined) {
    return jsonError(404, "unknown_worker", `coordinator ${JSON.stringify(beat.coordinator_id)} is not registered; register again`);
  }
  const rid = requestId(request);
  const headers = forwardHeaders(request, rid);
  headers.set("Content-Type", "application/json");
  const result = await forward([target], {
    method: "POST",
    pathAndQuery: "/api/worker/heartbeat",
    headers,
    body: { kind: "buffered", bytes: raw.slice().buffer },
    timeoutMs: cfg.upstreamTimeoutMs,
    attempts: 1,
    onFailure: (c) => reportFailure(env, cfg, ctx, c.id),
  });
  if (!result.ok) return exhausted(result, "the worker heartbeat");
  return withRequestId(result.response, rid);
}
