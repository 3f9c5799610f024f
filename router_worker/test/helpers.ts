/** Test helpers: call the router with per-test vars, count DO calls, fake coordinators. */
import { createExecutionContext, waitOnExecutionContext } from "cloudflare:test";
import { env as rawEnv } from "cloudflare:workers";
import { vi } from "vitest";
import worker from "../src/index";
import type { Env } from "../src/env";
import type { Registry } from "../src/registry";

let counter = 0;
const baseEnv = rawEnv as unknown as Env;

export interface Router {
  env: Env;
  /** RPC calls the Worker made on the registry stub, by method name. */
  doCalls: Record<string, number>;
  /** RPC methods that throw (a registry that is overloaded, resetting or unreachable). */
  broken: Set<string>;
  call(path: string, init?: RequestInit & { cf?: Record<string, unknown> }): Promise<Response>;
  stub(): DurableObjectStub<Registry>;
}

/** A router with its own registry (REGISTRY_NAME) and these var/secret overrides. */
export function router(overrides: Partial<Record<keyof Env, string>> = {}): Router {
  counter += 1;
  const name = `test-${counter}-${crypto.randomUUID().slice(0, 8)}`;
  const doCalls: Record<string, number> = {};
  const broken = new Set<string>();
  const realNs = baseEnv.REGISTRY;
  const ns = {
    getByName(n: string, opts?: DurableObjectNamespaceGetDurableObjectOptions) {
      const stub = realNs.getByName(n, opts) as unknown as Record<string, (...a: unknown[]) => unknown>;
      const counted: Record<string, (...a: unknown[]) => unknown> = {};
      for (const m of ["register", "heartbeat", "remove", "snapshot", "reportFailure", "sweep", "stats"]) {
        counted[m] = (...args: unknown[]) => {
          doCalls[m] = (doCalls[m] ?? 0) + 1;
          if (broken.has(m)) return Promise.reject(new Error("Durable Object is overloaded. Too many requests queued."));
          return (stub[m] as (...a: unknown[]) => unknown)(...args);
        };
      }
      return counted;
    },
  } as unknown as DurableObjectNamespace<Registry>;
  const env: Env = { ...baseEnv, SNAPSHOT_TTL_MS: "0", ...overrides, REGISTRY: ns, REGISTRY_NAME: name };
  return {
    env,
    doCalls,
    broken,
    async call(path, init = {}) {
      const { cf, ...rest } = init;
      const request = new Request(`https://api.rmatool.org.uk${path}`, { ...rest, cf } as RequestInit);
      const ctx = createExecutionContext();
      const resp = await worker.fetch(request as Request<unknown, IncomingRequestCfProperties>, env, ctx);
      await waitOnExecutionContext(ctx);
      return resp;
    },
    stub: () => realNs.getByName(name),
  };
}

export const CF_LONDON = { latitude: "51.5074", longitude: "-0.1278", country: "GB", continent: "EU", colo: "LHR" };
export const CF_PARIS = { latitude: "48.8566", longitude: "2.3522", country: "FR", continent: "EU", colo: "CDG" };
export const CF_NEW_YORK = { latitude: "40.7128", longitude: "-74.0060", country: "US", continent: "NA", colo: "EWR" };
export const CF_TOKYO = { latitude: "35.6762", longitude: "139.6503", country: "JP", continent: "AS", colo: "NRT" };
export const CF_SYDNEY = { latitude: "-33.8688", longitude: "151.2093", country: "AU", continent: "OC", colo: "SYD" };

export type Handler = (req: Request) => Response | Promise<Response>;

/**
 * The coordinators' network, as the Worker's outbound fetch() sees it: each tunnel origin maps
 * to a handler; an origin with no handler refuses the connection (fetch throws, as workerd does).
 */
export class FakeNet {
  readonly handlers = new Map<string, Handler>();
  readonly seen: { url: string; method: string; headers: Headers; body: string; redirect: string }[] = [];
  private readonly real = globalThis.fetch;

  install(): this {
    vi.spyOn(globalThis, "fetch").mockImplementation(async (input: RequestInfo | URL, init?: RequestInit) => {
      const req = new Request(input as RequestInfo, init);
      const origin = new URL(req.url).origin;
      const handler = this.handlers.get(origin);
      if (handler === undefined) {
        // A real connection attempt: loopback port 1 refuses it (ECONNREFUSED) inside workerd.
        if (origin === "http://127.0.0.1:1") {
          try {
            return await this.real("http://127.0.0.1:1/");
          } catch (err) {
            throw new TypeError(`connect to 127.0.0.1:1 failed: ${String(err)}`);
          }
        }
        throw new TypeError(`Network connection lost (no route to ${origin})`);
      }
      const body = req.method === "GET" || req.method === "HEAD" ? "" : await req.clone().text();
      this.seen.push({ url: req.url, method: req.method, headers: req.headers, body, redirect: req.redirect });
      return handler(req);
    });
    return this;
  }

  /** A coordinator at `origin` whose /health names `id`; `service` handles everything else. */
  coordinator(origin: string, id: string, service?: Handler): this {
    this.handlers.set(origin, (req) => {
      if (new URL(req.url).pathname === "/health") return Response.json({ coordinator_id: id, status: "ok" });
      return service ? service(req) : Response.json({ coordinator: id, path: new URL(req.url).pathname });
    });
    return this;
  }
}

export function edgeBeat(id: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { coordinator_id: id, workers: 2, services: [{ name: "echo", ready_workers: 2, models: [] }], load: 0.1, in_flight: 1, ...extra };
}

export async function register(
  r: Router,
  id: string,
  url: string,
  cf: Record<string, unknown> = CF_LONDON,
  extra: Record<string, unknown> = {},
  headers: Record<string, string> = {},
): Promise<Response> {
  return r.call("/api/edge/register", {
    method: "POST",
    headers: { "Content-Type": "application/json", ...headers },
    body: JSON.stringify({ coordinator_id: id, tunnel_url: url, ...extra }),
    cf,
  });
}

/** Register `id` at `url` and beat it once (so that it offers `echo`); returns its secret. */
export async function join(r: Router, id: string, url: string, cf: Record<string, unknown> = CF_LONDON, beat: Record<string, unknown> = {}): Promise<string> {
  const resp = await register(r, id, url, cf);
  const data = (await resp.json()) as { coordinator_secret: string };
  if (resp.status !== 200) throw new Error(`register ${id}: ${resp.status} ${JSON.stringify(data)}`);
  const b = await r.call("/api/edge/heartbeat", {
    method: "POST",
    headers: { Authorization: `Bearer ${data.coordinator_secret}` },
    body: JSON.stringify(edgeBeat(id, beat)),
  });
  if (b.status !== 200) throw new Error(`beat ${id}: ${b.status} ${await b.text()}`);
  return data.coordinator_secret;
}
