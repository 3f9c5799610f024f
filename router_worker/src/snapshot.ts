/**
 * The routing snapshot: the registry's coordinators, fetched with one DO request and then reused
 * for SNAPSHOT_TTL_MS by this isolate, and shared with the colo's other isolates through the
 * Cache API. A public request therefore costs about 0 Durable Object requests.
 */
import type { Config, Env } from "./env";
import { fail } from "./errors";
import type { CoordinatorView } from "./geo";
import type { Registry, Snapshot } from "./registry";
import { InvalidTunnelURL, validateTunnelUrl } from "./urls";

interface Held {
  views: CoordinatorView[];
  expires: number;
}

const held = new Map<string, Held>();
/** Failures this isolate saw but the snapshot may not show yet (decays like the registry's). */
const localFailures = new Map<string, { n: number; at: number }>();
const LOCAL_FAILURE_HALF_LIFE_MS = 30_000;

export function registry(env: Env, cfg: Config): DurableObjectStub<Registry> {
  return env.REGISTRY.getByName(cfg.registryName, {
    locationHint: cfg.locationHint as DurableObjectLocationHint,
  });
}

/**
 * A registry RPC whose failure (the object overloaded, resetting, or its colo unreachable) is
 * answered 503 `registry_unavailable` with Retry-After, not as a router bug.
 */
export async function rpc<T>(call: () => Promise<T>): Promise<T> {
  try {
    return await call();
  } catch (err) {
    console.error(JSON.stringify({ event: "registry_unavailable", error: err instanceof Error ? err.message.slice(0, 200) : "error" }));
    fail(503, "registry_unavailable", "the coordinator registry is unavailable; retry shortly", { "Retry-After": "5" });
  }
}

function cacheKey(cfg: Config): Request {
  return new Request(`https://snapshot.rma-edge-router.internal/v1/${encodeURIComponent(cfg.registryName)}`);
}

async function colocache(): Promise<Cache | null> {
  try {
    return typeof caches === "undefined" ? null : caches.default;
  } catch {
    return null;
  }
}

/**
 * Stored URLs passed the tunnel URL policy when they registered; they are checked again against
 * the policy in force now (say, after DEV_ALLOW_LOOPBACK was turned off) before any is fetched.
 */
function allowed(url: string, cfg: Config): boolean {
  try {
    return validateTunnelUrl(url, cfg.allowedSuffixes, cfg.devAllowLoopback) === url;
  } catch (err) {
    if (err instanceof InvalidTunnelURL) return false;
    throw err;
  }
}

/** Views with `last_seen` moved onto this isolate's clock. */
function rebase(snap: Snapshot, now: number): CoordinatorView[] {
  const shift = now - snap.generated_at;
  return snap.coordinators.map((c) => ({ ...c, last_seen: c.last_seen + shift }));
}

export async function coordinators(env: Env, cfg: Config, ctx: ExecutionContext | null): Promise<CoordinatorView[]> {
  const now = Date.now();
  const mine = held.get(cfg.registryName);
  if (mine !== undefined && now < mine.expires) return mine.views;
  const cache = cfg.snapshotTtlMs > 0 ? await colocache() : null;
  if (cache !== null) {
    const stored = await cache
      .match(cacheKey(cfg))
      .then((hit) => (hit === undefined ? null : (hit.json() as Promise<{ snap: Snapshot; expires: number }>)))
      .catch(() => null); // a cache failure only costs a DO request
    if (stored !== null && now < stored.expires) {
      const views = rebase(stored.snap, now).filter((c) => allowed(c.url, cfg));
      held.set(cfg.registryName, { views, expires: stored.expires });
      return views;
    }
  }
  let snap: Snapshot;
  try {
    snap = await registry(env, cfg).snapshot();
  } catch (err) {
    // The registry is down: route from the last snapshot this isolate held (its entries still
    // leave routing when their last beat passes the TTL), else answer 503.
    if (mine !== undefined) return mine.views;
    return rpc(() => Promise.reject(err));
  }
  const views = rebase(snap, now).filter((c) => allowed(c.url, cfg));
  // Held even with SNAPSHOT_TTL_MS=0 (expired at once): the fallback while the registry is down.
  held.set(cfg.registryName, { views, expires: now + cfg.snapshotTtlMs });
  if (cfg.snapshotTtlMs > 0) {
    const expires = now + cfg.snapshotTtlMs;
    if (cache !== null) {
      // The snapshot is re-based on this isolate's clock at `now`.
      const body = JSON.stringify({ snap: { generated_at: now, coordinators: views }, expires });
      const put = cache.put(
        cacheKey(cfg),
        new Response(body, {
          headers: {
            "Content-Type": "application/json",
            "Cache-Control": `max-age=${Math.max(1, Math.ceil(cfg.snapshotTtlMs / 1000))}`,
          },
        }),
      );
      if (ctx !== null) ctx.waitUntil(put.catch(() => undefined));
      else await put.catch(() => undefined);
    }
  }
  return views;
}

/** Forget the snapshot (after a registration or removal made it wrong). */
export async function invalidate(cfg: Config): Promise<void> {
  held.delete(cfg.registryName);
  const cache = await colocache();
  if (cache !== null) await cache.delete(cacheKey(cfg)).catch(() => false);
}

export function noteFailure(id: string, now: number): void {
  localFailures.set(id, { n: failuresOf(id, now) + 1, at: now });
}

function failuresOf(id: string, now: number): number {
  const f = localFailures.get(id);
  if (f === undefined) return 0;
  return f.n * 0.5 ** (Math.max(0, now - f.at) / LOCAL_FAILURE_HALF_LIFE_MS);
}

export function localFailureMap(now: number): Map<string, number> {
  const out = new Map<string, number>();
  for (const id of localFailures.keys()) {
    const n = failuresOf(id, now);
    if (n < 0.05) localFailures.delete(id);
    else out.set(id, n);
  }
  return out;
}

/** For tests: drop everything this isolate holds. */
export function resetIsolateState(): void {
  held.clear();
  localFailures.clear();
}
