/**
 * The registry Durable Object: one instance ("global") knows every edge coordinator.
 *
 * - SQLite holds one row per coordinator (id, tunnel URL, secret hash, location). Rows are
 *   written only on register, deregister and eviction: a heartbeat writes nothing.
 * - Liveness, load, services and recent failures live in memory. After a restart or an eviction
 *   from memory they are rebuilt from the next heartbeats; a restored entry that does not beat
 *   within the TTL is evicted.
 * - An alarm sweeps expired entries; it is armed only while coordinators exist.
 */
import { DurableObject } from "cloudflare:workers";
import { newSecret, sha256Hex, hexEquals } from "./auth";
import { config, type Config, type Env } from "./env";
import type { CoordinatorView, Location, ServiceView } from "./geo";
import type { EdgeHeartbeatRequest } from "./schemas";

/** Failures reported by the Worker halve every FAILURE_HALF_LIFE_MS. */
export const FAILURE_HALF_LIFE_MS = 30_000;

interface Row {
  id: string;
  tunnel_url: string;
  secret_hash: string;
  lat: number | null;
  lon: number | null;
  country: string | null;
  continent: string | null;
  colo: string | null;
  version: string | null;
  registered_at: number;
}

interface Live {
  last_seen: number;
  state: "active" | "draining";
  workers: number;
  services: ServiceView[];
  load: number;
  in_flight: number;
  failures: number;
  failure_at: number;
  /** Loaded from storage at start-up and not heard from since. */
  restored: boolean;
}

export interface RegisterInput {
  id: string;
  tunnelUrl: string;
  secret: string | null;
  loc: Location;
  version: string | null;
  /** MAX_COORDINATORS of the Worker: a new id beyond it is refused. */
  maxCoordinators?: number;
}

export type RegisterResult =
  | { ok: true; secret: string; replaced: boolean; heartbeat_interval: number }
  | { ok: false; error: "forbidden" | "full" };

export type Outcome = "ok" | "unknown" | "unauthorized";

export interface Snapshot {
  generated_at: number;
  coordinators: CoordinatorView[];
}

export interface RegistryStats {
  rows: number;
  rows_written: number;
  rows_read: number;
  database_size: number;
  alarm: number | null;
}

export class Registry extends DurableObject<Env> {
  private readonly sql: SqlStorage;
  private readonly rows = new Map<string, Row>();
  private readonly live = new Map<string, Live>();
  private rowsWritten = 0;
  private rowsRead = 0;
  /** The clock; tests replace it (fake clocks). */
  clock: () => number = () => Date.now();

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
    this.exec(`CREATE TABLE IF NOT EXISTS coordinators (
      id TEXT PRIMARY KEY,
      tunnel_url TEXT NOT NULL,
      secret_hash TEXT NOT NULL,
      lat REAL, lon REAL, country TEXT, continent TEXT, colo TEXT,
      version TEXT,
      registered_at INTEGER NOT NULL
    )`);
    this.rowsWritten = 0; // the schema itself is not a registration
    ctx.blockConcurrencyWhile(async () => {
      this.load();
      if (this.rows.size > 0 && (await ctx.storage.getAlarm()) === null) await this.arm();
    });
  }

  private get cfg(): Config {
    return config(this.env);
  }

  private exec<T extends Record<string, SqlStorageValue>>(query: string, ...args: unknown[]): T[] {
    const cursor = this.sql.exec<T>(query, ...args);
    const out = cursor.toArray();
    this.rowsWritten += cursor.rowsWritten;
    this.rowsRead += cursor.rowsRead;
    return out;
  }

  /** (Re)build memory from storage: every row is "restored" until it beats. */
  load(): void {
    const now = this.clock();
    this.rows.clear();
    this.live.clear();
    for (const r of this.exec<Record<string, SqlStorageValue>>("SELECT * FROM coordinators")) {
      const row = r as unknown as Row;
      this.rows.set(row.id, row);
      this.live.set(row.id, blankLive(now, true));
    }
  }

  private async arm(): Promise<void> {
    const cfg = this.cfg;
    // Eviction only needs to be timely within EVICT_AFTER; routing ignores stale entries anyway.
    const every = Math.max(1000, cfg.evictAfterMs / 2);
    await this.ctx.storage.setAlarm(this.clock() + every);
  }

  private liveOf(id: string): Live {
    let l = this.live.get(id);
    if (l === undefined) {
      l = blankLive(this.clock(), true);
      this.live.set(id, l);
    }
    return l;
  }

  private expired(id: string, now: number): boolean {
    const l = this.liveOf(id);
    const cfg = this.cfg;
    return now - l.last_seen > (l.restored ? cfg.ttlMs : cfg.evictAfterMs);
  }

  // ------------------------------------------------------------------ RPC

  async register(input: RegisterInput): Promise<RegisterResult> {
    const now = this.clock();
    const existing = this.rows.get(input.id);
    let secret: string | null = null;
    if (input.secret !== null) {
      const presented = await sha256Hex(input.secret);
      if (existing !== undefined && hexEquals(presented, existing.secret_hash)) secret = input.secret;
    }
    if (existing !== undefined && secret === null && !this.expired(input.id, now)) {
      return { ok: false, error: "forbidden" };
    }
    if (existing === undefined && input.maxCoordinators !== undefined && this.rows.size >= input.maxCoordinators) {
      // Full: expired entries give their place up (one row deleted each), as the alarm would.
      for (const id of [...this.rows.keys()]) if (this.expired(id, now)) this.drop(id);
      if (this.rows.size >= input.maxCoordinators) return { ok: false, error: "full" };
    }
    // A new (or expired) id keeps the secret its coordinator proposes (the agent persists one
    // before it registers), so a registration whose reply was lost can simply be repeated.
    secret ??= input.secret ?? newSecret();
    const row: Row = {
      id: input.id,
      tunnel_url: input.tunnelUrl,
      secret_hash: await sha256Hex(secret),
      lat: input.loc.lat,
      lon: input.loc.lon,
      country: input.loc.country,
      continent: input.loc.continent,
      colo: input.loc.colo,
      version: input.version,
      registered_at: existing?.registered_at ?? now,
    };
    this.exec(
      `INSERT INTO coordinators (id, tunnel_url, secret_hash, lat, lon, country, continent, colo, version, registered_at)
       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
       ON CONFLICT(id) DO UPDATE SET tunnel_url = excluded.tunnel_url, secret_hash = excluded.secret_hash,
         lat = excluded.lat, lon = excluded.lon, country = excluded.country, continent = excluded.continent,
         colo = excluded.colo, version = excluded.version`,
      row.id, row.tunnel_url, row.secret_hash, row.lat, row.lon, row.country, row.continent,
      row.colo, row.version, row.registered_at,
    );
    this.rows.set(row.id, row);
    const previous = this.live.get(row.id);
    const l = blankLive(now, false);
    if (previous !== undefined && existing !== undefined && existing.secret_hash === row.secret_hash) {
      l.workers = previous.workers;
      l.services = previous.services;
      l.load = previous.load;
    }
    this.live.set(row.id, l);
    if ((await this.ctx.storage.getAlarm()) === null) await this.arm();
    return { ok: true, secret, replaced: existing !== undefined, heartbeat_interval: this.cfg.heartbeatIntervalS };
  }

  /** Liveness and load, in memory only: no storage write. */
  async heartbeat(secret: string, beat: EdgeHeartbeatRequest): Promise<Outcome> {
    const row = this.rows.get(beat.coordinator_id);
    if (row === undefined) return "unknown";
    if (!hexEquals(await sha256Hex(secret), row.secret_hash)) return "unauthorized";
    const l = this.liveOf(row.id);
    l.last_seen = this.clock();
    l.restored = false;
    l.state = beat.state ?? "active";
    l.workers = beat.workers ?? 0;
    l.load = beat.load ?? 0;
    l.in_flight = beat.in_flight ?? 0;
    l.services = (beat.services ?? []).map((s) => ({
      name: s.name,
      ready_workers: s.ready_workers,
      models: s.models ?? [],
      aliases: s.aliases ?? [],
    }));
    return "ok";
  }

  /** Deregister: with the coordinator's secret, or `admin` (checked by the Worker). */
  async remove(id: string, secret: string | null, admin: boolean): Promise<Outcome> {
    const row = this.rows.get(id);
    if (row === undefined) return "unknown";
    if (!admin) {
      if (secret === null || !hexEquals(await sha256Hex(secret), row.secret_hash)) return "unauthorized";
    }
    this.drop(id);
    if (this.rows.size === 0) await this.ctx.storage.deleteAlarm();
    return "ok";
  }

  private drop(id: string): void {
    this.exec("DELETE FROM coordinators WHERE id = ?", id);
    this.rows.delete(id);
    this.live.delete(id);
  }

  /** Passive health: the Worker saw this coordinator fail (memory only). */
  async reportFailure(id: string): Promise<void> {
    const l = this.live.get(id);
    if (l === undefined) return;
    const now = this.clock();
    l.failures = decayed(l, now) + 1;
    l.failure_at = now;
  }

  async snapshot(): Promise<Snapshot> {
    const now = this.clock();
    const coordinators: CoordinatorView[] = [];
    for (const row of this.rows.values()) {
      const l = this.liveOf(row.id);
      coordinators.push({
        id: row.id,
        url: row.tunnel_url,
        loc: { lat: row.lat, lon: row.lon, country: row.country, continent: row.continent, colo: row.colo },
        state: l.state,
        workers: l.workers,
        services: l.services,
        load: l.load,
        in_flight: l.in_flight,
        last_seen: l.last_seen,
        failures: Math.round(decayed(l, now) * 100) / 100,
        registered_at: row.registered_at,
      });
    }
    coordinators.sort((a, b) => (a.id < b.id ? -1 : 1));
    return { generated_at: now, coordinators };
  }

  /** Evict expired entries (one row deleted each); re-arm only while coordinators remain. */
  async sweep(): Promise<string[]> {
    const now = this.clock();
    const evicted: string[] = [];
    for (const id of [...this.rows.keys()]) {
      if (this.expired(id, now)) {
        this.drop(id);
        evicted.push(id);
      }
    }
    if (this.rows.size > 0) await this.arm();
    else await this.ctx.storage.deleteAlarm();
    return evicted;
  }

  override async alarm(): Promise<void> {
    await this.sweep();
  }

  async stats(): Promise<RegistryStats> {
    return {
      rows: this.rows.size,
      rows_written: this.rowsWritten,
      rows_read: this.rowsRead,
      database_size: this.sql.databaseSize,
      alarm: await this.ctx.storage.getAlarm(),
    };
  }
}

function blankLive(now: number, restored: boolean): Live {
  return {
    last_seen: now,
    state: "active",
    workers: 0,
    services: [],
    load: 0,
    in_flight: 0,
    failures: 0,
    failure_at: now,
    restored,
  };
}

function decayed(l: Live, now: number): number {
  if (l.failures === 0) return 0;
  const f = l.failures * 0.5 ** (Math.max(0, now - l.failure_at) / FAILURE_HALF_LIFE_MS);
  return f < 0.05 ? 0 : f;
}
