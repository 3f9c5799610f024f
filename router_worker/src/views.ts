/** Read-only views: GET /health and GET /api/coordinators (URLs only with ADMIN_TOKEN). */
import { bearer, secretEquals } from "./auth";
import type { Config, Env } from "./env";
import { jsonResponse } from "./errors";
import { isHealthy } from "./geo";
import { coordinators } from "./snapshot";

export const VERSION = "0.1.0";

export async function health(env: Env, cfg: Config, ctx: ExecutionContext): Promise<Response> {
  const now = Date.now();
  const all = await coordinators(env, cfg, ctx);
  const healthy = all.filter((c) => isHealthy(c, now, cfg.ttlMs));
  const services: Record<string, number> = {};
  for (const c of healthy) for (const s of c.services) services[s.name] = (services[s.name] ?? 0) + s.ready_workers;
  return jsonResponse({
    status: "ok",
    service: "rma-edge-router",
    version: VERSION,
    protocol_version: 1,
    coordinators: { registered: all.length, healthy: healthy.length },
    services,
  });
}

export async function list(request: Request, env: Env, cfg: Config, ctx: ExecutionContext): Promise<Response> {
  const token = bearer(request);
  const admin = token !== null && env.ADMIN_TOKEN ? await secretEquals(token, env.ADMIN_TOKEN) : false;
  const now = Date.now();
  const all = await coordinators(env, cfg, ctx);
  return jsonResponse({
    coordinators: all.map((c) => ({
      coordinator_id: c.id,
      country: c.loc.country,
      continent: c.loc.continent,
      colo: c.loc.colo,
      state: c.state,
      healthy: isHealthy(c, now, cfg.ttlMs),
      workers: c.workers,
      services: c.services.map((s) => ({ name: s.name, ready_workers: s.ready_workers, models: s.models })),
      load: c.load,
      in_flight: c.in_flight,
      last_seen_s: Math.max(0, Math.round((now - c.last_seen) / 100) / 10),
      ...(admin ? { tunnel_url: c.url, lat: c.loc.lat, lon: c.loc.lon, failures: c.failures } : {}),
    })),
  });
}
