/**
 * rma-edge-router: the federation's one public entry point (https://api.rmatool.org.uk).
 * Entry and routing only; the endpoints live in edge.ts, workers.ts, service.ts and views.ts.
 */
import { config, type Env } from "./env";
import * as edge from "./edge";
import { HttpError, jsonError } from "./errors";
import { service } from "./service";
import * as views from "./views";
import * as workers from "./workers";

export { Registry } from "./registry";
export type { Env } from "./env";

function notAllowed(request: Request, allow: string): Response {
  return jsonError(405, "method_not_allowed", `${request.method} ${new URL(request.url).pathname}`, { Allow: allow });
}

async function route(request: Request, env: Env, ctx: ExecutionContext): Promise<Response> {
  const cfg = config(env);
  const url = new URL(request.url);
  const path = url.pathname;
  const method = request.method.toUpperCase();

  const svc = /^\/service\/([^/]*)(?:\/.*)?$/.exec(path);
  if (svc !== null) return service(request, env, cfg, ctx, decodeURIComponent(svc[1] ?? ""));

  switch (path) {
    case "/health":
      return method === "GET" || method === "HEAD" ? views.health(env, cfg, ctx) : notAllowed(request, "GET");
    case "/api/coordinators":
      return method === "GET" ? views.list(request, env, cfg, ctx) : notAllowed(request, "GET");
    case "/api/edge/register":
      return method === "POST" ? edge.register(request, env, cfg) : notAllowed(request, "POST");
    case "/api/edge/heartbeat":
      return method === "POST" ? edge.heartbeat(request, env, cfg) : notAllowed(request, "POST");
    case "/api/worker/register":
      return method === "POST" ? workers.register(request, env, cfg, ctx) : notAllowed(request, "POST");
    case "/api/worker/heartbeat":
      return method === "POST" ? workers.heartbeat(request, env, cfg, ctx) : notAllowed(request, "POST");
    default:
      break;
  }
  const del = /^\/api\/edge\/([^/]+)$/.exec(path);
  if (del !== null) {
    return method === "DELETE" ? edge.remove(request, env, cfg, decodeURIComponent(del[1] ?? "")) : notAllowed(request, "DELETE");
  }
  return jsonError(404, "not_found", `${method} ${path}`);
}

export default {
  async fetch(request: Request, env: Env, ctx: ExecutionContext): Promise<Response> {
    try {
      return await route(request, env, ctx);
    } catch (err) {
      if (err instanceof HttpError) return err.response;
      if (err instanceof URIError) return jsonError(400, "invalid_path", "the path is not valid percent-encoding");
      console.error(JSON.stringify({ event: "internal_error", error: err instanceof Error ? err.message : String(err) }));
      return jsonError(500, "internal_error", "the router failed; this is a bug");
    }
  },
} satisfies ExportedHandler<Env>;
