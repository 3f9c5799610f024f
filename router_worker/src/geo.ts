/**
 * Coordinator selection: pure, deterministic functions of (snapshot, caller location, clock).
 *
 * Distance is the haversine distance from the caller's `request.cf.latitude/longitude` to the
 * coordinator's registration location. When either side has no coordinates the distance is
 * estimated from country, then continent. Load and recent failures add a penalty (in km), so a
 * saturated or failing coordinator next door loses to a healthy one a little farther away.
 * Coordinators that are draining, or whose last beat is older than the TTL, are never picked.
 */

export interface Location {
  lat: number | null;
  lon: number | null;
  country: string | null;
  continent: string | null;
  colo: string | null;
}

export interface ServiceView {
  name: string;
  ready_workers: number;
  models: string[];
  /** Other names the coordinator resolves to this service (`llm` for `llm-inference`). */
  aliases: string[];
}

/** A coordinator as the routing snapshot carries it. */
export interface CoordinatorView {
  id: string;
  url: string;
  loc: Location;
  state: "active" | "draining";
  workers: number;
  services: ServiceView[];
  load: number;
  in_flight: number;
  /** Epoch ms of the last heartbeat (or of the registration / registry start). */
  last_seen: number;
  /** Failures reported recently (passive health), decayed by the registry. */
  failures: number;
  registered_at: number;
}

export const EARTH_RADIUS_KM = 6371.0088;
/** Estimated distances when coordinates are missing. */
export const SAME_COUNTRY_KM = 500;
export const SAME_CONTINENT_KM = 2500;
export const ELSEWHERE_KM = 12_000;
/** A fully loaded coordinator counts as this much farther away. */
export const LOAD_PENALTY_KM = 3000;
/** Each recent failure counts as this much farther away. */
export const FAILURE_PENALTY_KM = 5000;

function coordinate(value: unknown, limit: number): number | null {
  if (value === null || value === undefined || value === "") return null;
  const n = typeof value === "number" ? value : typeof value === "string" ? Number(value.trim()) : NaN;
  return Number.isFinite(n) && Math.abs(n) <= limit ? n : null;
}

function code(value: unknown): string | null {
  if (typeof value !== "string") return null;
  const v = value.trim().toUpperCase();
  return /^[A-Z0-9]{1,8}$/.test(v) ? v : null;
}

/** A location from `request.cf` (any shape: absent, strings, numbers, junk). */
export function locationFromCf(cf: unknown): Location {
  const c = (typeof cf === "object" && cf !== null ? cf : {}) as Record<string, unknown>;
  let lat = coordinate(c.latitude, 90);
  let lon = coordinate(c.longitude, 180);
  if (lat === null || lon === null) {
    lat = null;
    lon = null;
  }
  return { lat, lon, country: code(c.country), continent: code(c.continent), colo: code(c.colo) };
}

export function haversineKm(lat1: number, lon1: number, lat2: number, lon2: number): number {
  const rad = Math.PI / 180;
  const dLat = (lat2 - lat1) * rad;
  const dLon = (lon2 - lon1) * rad;
  const a =
    Math.sin(dLat / 2) ** 2 + Math.cos(lat1 * rad) * Math.cos(lat2 * rad) * Math.sin(dLon / 2) ** 2;
  return 2 * EARTH_RADIUS_KM * Math.asin(Math.min(1, Math.sqrt(a)));
}

/** Distance in km, measured when both sides have coordinates, else estimated. */
export function distanceKm(caller: Location, target: Location): number {
  if (caller.lat !== null && caller.lon !== null && target.lat !== null && target.lon !== null) {
    return haversineKm(caller.lat, caller.lon, target.lat, target.lon);
  }
  if (caller.country !== null && caller.country === target.country) return SAME_COUNTRY_KM;
  if (caller.continent !== null && caller.continent === target.continent) return SAME_CONTINENT_KM;
  return ELSEWHERE_KM;
}

export interface SelectOptions {
  now: number;
  ttlMs: number;
  /** Only coordinators reporting this service with at least one ready worker. */
  service?: string;
  /** Extra failures seen by this isolate (not yet in the snapshot), by coordinator id. */
  localFailures?: ReadonlyMap<string, number>;
}

export function isHealthy(c: CoordinatorView, now: number, ttlMs: number): boolean {
  return c.state === "active" && now - c.last_seen <= ttlMs;
}

export function offers(c: CoordinatorView, service: string): boolean {
  return c.services.some((s) => s.ready_workers > 0 && (s.name === service || s.aliases.includes(service)));
}

export function score(c: CoordinatorView, caller: Location, failures: number): number {
  const load = Math.min(1, Math.max(0, c.load));
  return distanceKm(caller, c.loc) + load * LOAD_PENALTY_KM + failures * FAILURE_PENALTY_KM;
}

/** Eligible coordinators, best first. Ties: lower load, then fewer failures, then id. */
export function rank(
  coordinators: readonly CoordinatorView[],
  caller: Location,
  opts: SelectOptions,
): CoordinatorView[] {
  const scored: { c: CoordinatorView; s: number; f: number }[] = [];
  for (const c of coordinators) {
    if (!isHealthy(c, opts.now, opts.ttlMs)) continue;
    if (opts.service !== undefined && !offers(c, opts.service)) continue;
    const f = c.failures + (opts.localFailures?.get(c.id) ?? 0);
    scored.push({ c, s: score(c, caller, f), f });
  }
  scored.sort(
    (a, b) => a.s - b.s || a.c.load - b.c.load || a.f - b.f || (a.c.id < b.c.id ? -1 : a.c.id > b.c.id ? 1 : 0),
  );
  return scored.map((x) => x.c);
}
