/** The coordinators' side: POST /api/edge/register, POST /api/edge/heartbeat, DELETE /api/edge/{id}. */
import { bearer, secretEquals } from "./auth";
import type { Config, Env } from "./env";
import { fail, jsonError, jsonResponse } from "./errors";
import { locationFromCf } from "./geo";
import {
  ID_PATTERN,
  MAX_CONTROL_BODY,
  parseBody,
  readCapped,
  readStreamCapped,
  type EdgeHeartbeatRequest,
  type EdgeRegisterRequest,
} from "./schemas";
import type { RegisterResult } from "./registry";
import { invalidate, registry, rpc } from "./snapshot";
import { InvalidTunnelURL, validateTunnelUrl } from "./urls";

const UNAUTHORIZED = { "WWW-Authenticate": "Bearer" };

/** GET <tunnel_url>/health must answer this coordinator's id: nobody registers another's URL. */
async function checkHealth(url: string, id: string, cfg: Config): Promise<void> {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(new Error("timeout")), cfg.upstreamTimeoutMs);
  let status: number;
  let bytes: Uint8Array | null;
  try {
    const resp = await fetch(`${url}/health`, {
      headers: { Accept: "application/json" },
      redirect: "manual",
      signal: controller.signal,
    });
    status = resp.status;
    // The URL is the registrant's: read at most MAX_CONTROL_BODY of whatever it answers.
    bytes = status === 200 ? await readStreamCapped(resp.body, MAX_CONTROL_BODY) : null;
    if (status !== 200) await resp.body?.cancel().catch(() => undefined);
  } catch (err) {
    fail(502, "health_check_failed", `GET ${url}/health: ${err instanceof Error ? err.message : String(err)}`);
  } finally {
    clearTimeout(timer);
  }
  if (status !== 200) fail(502, "health_check_failed", `GET ${url}/health answered HTTP ${status}`);
  if (bytes === null) fail(502, "health_check_failed", `GET ${url}/health answered more than ${MAX_CONTROL_BODY} bytes`);
  let answered: unknown;
  try {
    answered = (JSON.parse(new TextDecoder().decode(bytes)) as { coordinator_id?: unknown }).coordinator_id;
  } catch {
    fail(502, "health_check_failed", `GET ${url}/health did not answer JSON`);
  }
  if (answered !== id) {
    fail(422, "coordinator_id_mismatch", `the coordinator at tunnel_url is not ${JSON.stringify(id)}`);
  }
}

export async function register(request: Request, env: Env, cfg: Config): Promise<Response> {
  const raw = await readCapped(request, MAX_CONTROL_BODY);
  if (env.FEDERATION_JOIN_TOKEN) {
    const token = bearer(request);
    if (token === null || !(await secretEquals(token, env.FEDERATION_JOIN_TOKEN))) {
      return jsonError(401, "unauthorized", "registration needs the federation's join token (Authorization: Bearer ...)", UNAUTHORIZED);
    }
  }
  const req = parseBody<EdgeRegisterRequest>(raw, "edgeRegister");
  let url: string;
  try {
    url = validateTunnelUrl(req.tunnel_url, cfg.allowedSuffixes, cfg.devAllowLoopback);
  } catch (err) {
    if (err instanceof InvalidTunnelURL) return jsonError(422, "invalid_tunnel_url", err.message);
    throw err;
  }
  await checkHealth(url, req.coordinator_id, cfg);
  const result = await rpc(
    async (): Promise<RegisterResult> =>
      await registry(env, cfg).register({
        id: req.coordinator_id,
        tunnelUrl: url,
        secret: req.coordinator_secret ?? null,
        loc: locationFromCf(request.cf),
        version: req.version ?? null,
        maxCoordinators: cfg.maxCoordinators,
      }),
  );
  if (!result.ok && result.error === "full") {
    return jsonError(503, "registry_full", `the registry holds its maximum of ${cfg.maxCoordinators} coordinators (MAX_COORDINATORS)`, { "Retry-After": "60" });
  }
  if (!result.ok) {
    return jsonError(403, "forbidden", "this coordinator_id is registered; re-registering it needs its coordinator_secret");
  }
  await invalidate(cfg);
  return jsonResponse({
    coordinator_id: req.coordinator_id,
    coordinator_secret: result.secret,
    heartbeat_interval: result.heartbeat_interval,
  });
}

export async function heartbeat(request: Request, env: Env, cfg: Config): Promise<Response> {
  const raw = await readCapped(request, MAX_CONTROL_BODY);
  const secret = bearer(request);
  if (secret === null) {
    return jsonError(401, "unauthorized", "heartbeats need the coordinator_secret (Authorization: Bearer ...)", UNAUTHORIZED);
  }
  const beat = parseBody<EdgeHeartbeatRequest>(raw, "edgeHeartbeat");
  const outcome = await rpc(() => registry(env, cfg).heartbeat(secret, beat));
  if (outcome === "unknown") {
    return jsonError(404, "unknown_coordinator", `coordinator ${JSON.stringify(beat.coordinator_id)} is not registered; register again`);
  }
  if (outcome === "unauthorized") {
    return jsonError(401, "unauthorized", "wrong coordinator_secret", UNAUTHORIZED);
  }
  return jsonResponse({ ok: true, coordinator_id: beat.coordinator_id, heartbeat_interval: cfg.heartbeatIntervalS });
}

export async function remove(request: Request, env: Env, cfg: Config, id: string): Promise<Response> {
  if (!ID_PATTERN.test(id)) return jsonError(400, "invalid_coordinator_id", `coordinator ids match ${ID_PATTERN.source}`);
  const token = bearer(request);
  if (token === null) {
    return jsonError(401, "unauthorized", "removing a coordinator needs its secret or the admin token", UNAUTHORIZED);
  }
  const admin = env.ADMIN_TOKEN ? await secretEquals(token, env.ADMIN_TOKEN) : false;
  const outcome = await rpc(() => registry(env, cfg).remove(id, admin ? null : token, admin));
  if (outcome === "unknown") return jsonError(404, "unknown_coordinator", `coordinator ${JSON.stringify(id)} is not registered`);
  if (outcome === "unauthorized") return jsonError(401, "unauthorized", "wrong coordinator_secret", UNAUTHORIZED);
  await invalidate(cfg);
  return jsonResponse({ removed: id });
}
