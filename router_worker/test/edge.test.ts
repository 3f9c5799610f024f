import { runDurableObjectAlarm, runInDurableObject } from "cloudflare:test";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import type { Registry } from "../src/registry";
import { resetIsolateState } from "../src/snapshot";
import { CF_LONDON, edgeBeat, FakeNet, join, register, router } from "./helpers";

const URL_A = "https://alpha-beta.trycloudflare.com";
let net: FakeNet;

beforeEach(() => {
  resetIsolateState();
  net = new FakeNet().install();
  net.coordinator(URL_A, "coord-a");
});
afterEach(() => {
  vi.restoreAllMocks();
});

async function beat(r: ReturnType<typeof router>, secret: string | null, body: unknown): Promise<Response> {
  return r.call("/api/edge/heartbeat", {
    method: "POST",
    headers: secret === null ? {} : { Authorization: `Bearer ${secret}` },
    body: JSON.stringify(body),
  });
}

describe("POST /api/edge/register", () => {
  it("registers after checking /health, and answers a secret and the interval", async () => {
    const r = router();
    const resp = await register(r, "coord-a", URL_A);
    expect(resp.status).toBe(200);
    const data = (await resp.json()) as Record<string, unknown>;
    expect(data).toMatchObject({ coordinator_id: "coord-a", heartbeat_interval: 10 });
    expect(String(data.coordinator_secret).length).toBeGreaterThanOrEqual(40);
    expect(net.seen.map((s) => s.url)).toEqual([`${URL_A}/health`]);
    const list = (await (await r.call("/api/coordinators")).json()) as { coordinators: Record<string, unknown>[] };
    expect(list.coordinators).toHaveLength(1);
    expect(list.coordinators[0]).toMatchObject({ coordinator_id: "coord-a", country: "GB", continent: "EU", colo: "LHR", healthy: true });
    expect(JSON.stringify(list)).not.toContain("trycloudflare");
    expect(JSON.stringify(list)).not.toContain(String(data.coordinator_secret));
  });

  it("stores the secret hashed, never in clear", async () => {
    const r = router();
    const secret = await join(r, "coord-a", URL_A);
    const stored = await runInDurableObject(r.stub(), (_: Registry, state) =>
      state.storage.sql.exec("SELECT * FROM coordinators").toArray(),
    );
    expect(stored).toHaveLength(1);
    expect(JSON.stringify(stored)).not.toContain(secret);
    expect(stored[0]).toMatchObject({ id: "coord-a", tunnel_url: URL_A, country: "GB", lat: 51.5074 });
  });

  it("refuses a coordinator whose /health names another id, or fails", async () => {
    const r = router();
    net.coordinator("https://liar.trycloudflare.com", "someone-else");
    let resp = await register(r, "coord-a", "https://liar.trycloudflare.com");
    expect(resp.status).toBe(422);
    expect(await resp.json()).toMatchObject({ error: "coordinator_id_mismatch", hop: "router" });
    net.handlers.set("https://broken.trycloudflare.com", () => new Response("<html>530</html>", { status: 530 }));
    resp = await register(r, "coord-a", "https://broken.trycloudflare.com");
    expect(resp.status).toBe(502);
    expect(await resp.json()).toMatchObject({ error: "health_check_failed" });
    resp = await register(r, "coord-a", "https://nobody.trycloudflare.com");
    expect(resp.status).toBe(502);
    net.handlers.set("https://redir.trycloudflare.com", () => Response.redirect("https://alpha-beta.trycloudflare.com/health", 302));
    resp = await register(r, "coord-a", "https://redir.trycloudflare.com");
    expect(resp.status).toBe(502);
  });

  it("needs FEDERATION_JOIN_TOKEN when it is set", async () => {
    const r = router({ FEDERATION_JOIN_TOKEN: "join-token-0123456789" });
    for (const headers of [{}, { Authorization: "Bearer nope" }, { Authorization: "Basic join-token-0123456789" }] as Record<string, string>[]) {
      const resp = await register(r, "coord-a", URL_A, CF_LONDON, {}, headers);
      expect(resp.status).toBe(401);
      expect(resp.headers.get("WWW-Authenticate")).toBe("Bearer");
      expect(await resp.json()).toMatchObject({ error: "unauthorized", hop: "router" });
    }
    expect(net.seen).toHaveLength(0);
    const ok = await register(r, "coord-a", URL_A, CF_LONDON, {}, { Authorization: "Bearer join-token-0123456789" });
    expect(ok.status).toBe(200);
  });

  it("refuses a hijack of a live id, accepts the owner's re-registration", async () => {
    const r = router();
    const secret = await join(r, "coord-a", URL_A);
    net.coordinator("https://evil.trycloudflare.com", "coord-a");
    for (const extra of [{}, { coordinator_secret: "x".repeat(40) }]) {
      const resp = await register(r, "coord-a", "https://evil.trycloudflare.com", CF_LONDON, extra);
      expect(resp.status).toBe(403);
      expect(await resp.json()).toMatchObject({ error: "forbidden", hop: "router" });
    }
    const admin = (await (await router().call("/api/coordinators")).json()) as object;
    expect(admin).toBeDefined();
    // The owner moves to a new tunnel URL with its secret: same secret back.
    net.coordinator("https://new-home.trycloudflare.com", "coord-a");
    const moved = await register(r, "coord-a", "https://new-home.trycloudflare.com", CF_LONDON, { coordinator_secret: secret });
    expect(moved.status).toBe(200);
    expect(await moved.json()).toMatchObject({ coordinator_secret: secret });
    const rows = await runInDurableObject(r.stub(), (_: Registry, s) => s.storage.sql.exec("SELECT tunnel_url FROM coordinators").toArray());
    expect(rows).toEqual([{ tunnel_url: "https://new-home.trycloudflare.com" }]);
  });

  it("keeps the secret a new coordinator proposes, so a registration whose reply was lost can be repeated", async () => {
    const r = router();
    net.coordinator(URL_A, "coord-a");
    const proposed = "proposed-secret-".padEnd(43, "x");
    const first = await register(r, "coord-a", URL_A, CF_LONDON, { coordinator_secret: proposed });
    expect(first.status).toBe(200);
    expect(await first.json()).toMatchObject({ coordinator_secret: proposed });
    // The reply never reached the agent: it registers again with the secret it kept.
    const again = await register(r, "coord-a", URL_A, CF_LONDON, { coordinator_secret: proposed });
    expect(again.status).toBe(200);
    expect(await again.json()).toMatchObject({ coordinator_secret: proposed });
    // Anybody else still needs that secret.
    const other = await register(r, "coord-a", URL_A, CF_LONDON, { coordinator_secret: "y".repeat(43) });
    expect(other.status).toBe(403);
  });

  it("lets another take an id whose entry expired", async () => {
    const r = router();
    await join(r, "coord-a", URL_A);
    await runInDurableObject(r.stub(), (o: Registry) => {
      const t = Date.now() + 121_000;
      o.clock = () => t;
    });
    const resp = await register(r, "coord-a", URL_A);
    expect(resp.status).toBe(200);
  });

  it.each([
    ["http://alpha.trycloudflare.com", "https"],
    ["https://169.254.169.254", "IP address"],
    ["https://10.0.0.1", "IP address"],
    ["https://[::ffff:a9fe:a9fe]", "IP address"],
    ["https://2130706433", "IP address"],
    ["https://0x7f.0.0.1", "IP address"],
    ["https://a@alpha.trycloudflare.com", "credentials"],
    ["https://alpha.trycloudflare.com@evil.net", "credentials"],
    ["https://alpha.trycloudflare.com:8443", "port"],
    ["https://trycloudflare.com.evil.net", "allowed suffix"],
    ["https://eviltrycloudflare.com", "allowed suffix"],
    ["https://.trycloudflare.com", "DNS name"],
    ["https://trycloudflare.com", "allowed suffix"],
    ["https://alpha.trycloudflare.com/path", "origin"],
    ["https://alpha.trycloudflare.com?x=1", "origin"],
    ["https://alpha.trycloudflare.com#f", "origin"],
    ["https://xn--80ak6aa92e.trycloudflare.com", "IDN"],
    ["https://аpple.trycloudflare.com", "ASCII"],
    ["https://alpha.trycloudflare.com\\@evil.net", "credentials"],
    ["https://alpha%2etrycloudflare.com", "DNS name"],
    ["ftp://alpha.trycloudflare.com", "https"],
    ["javascript:alert(1)//x", "parse"],
    ["https://al_pha.trycloudflare.com", "DNS name"],
    ["http://127.0.0.1:8080", "dev mode"],
    ["http://localhost:8080", "dev mode"],
  ])("refuses tunnel_url %s", async (url, why) => {
    const r = router({ DEV_ALLOW_LOOPBACK: "false" });
    const resp = await register(r, "coord-a", url);
    const data = (await resp.json()) as { error: string; detail: string };
    expect([400, 422]).toContain(resp.status);
    if (resp.status === 422 && data.error === "invalid_tunnel_url") expect(data.detail).toContain(why);
    expect(net.seen).toHaveLength(0); // nothing fetched
  });

  it("accepts loopback only in dev mode, and the operator's own suffix", async () => {
    const dev = router({ DEV_ALLOW_LOOPBACK: "true" });
    net.coordinator("http://127.0.0.1:8080", "coord-l");
    expect((await register(dev, "coord-l", "http://127.0.0.1:8080")).status).toBe(200);
    expect((await register(dev, "coord-m", "http://127.0.0.1")).status).toBe(422);
    const own = router({ ALLOWED_TUNNEL_SUFFIXES: ".trycloudflare.com, tunnels.rmatool.org.uk" });
    net.coordinator("https://c1.tunnels.rmatool.org.uk", "coord-own");
    expect((await register(own, "coord-own", "https://c1.tunnels.rmatool.org.uk")).status).toBe(200);
    expect((await register(own, "coord-x", "https://c1.tunnels.rmatool.org.uk.evil.net")).status).toBe(422);
  });

  it("validates the body against the exported schema", async () => {
    const r = router();
    const post = (body: string) => r.call("/api/edge/register", { method: "POST", body });
    let resp = await post("{nope");
    expect(resp.status).toBe(400);
    expect(await resp.json()).toMatchObject({ error: "invalid_json", hop: "router" });
    for (const body of [
      { tunnel_url: URL_A },
      { coordinator_id: "bad id!", tunnel_url: URL_A },
      { coordinator_id: "coord-a", tunnel_url: URL_A, extra: 1 },
      { coordinator_id: "coord-a", tunnel_url: URL_A, coordinator_secret: "short" },
      [1, 2],
    ]) {
      resp = await post(JSON.stringify(body));
      expect(resp.status).toBe(422);
      expect(await resp.json()).toMatchObject({ error: "invalid_request", hop: "router" });
    }
    resp = await post(JSON.stringify({ coordinator_id: "coord-a", tunnel_url: URL_A, protocol_version: 2 }));
    expect(resp.status).toBe(400);
    expect(await resp.json()).toMatchObject({ error: "unsupported_protocol_version" });
    resp = await post("x".repeat(70_000));
    expect(resp.status).toBe(413);
    expect(await resp.json()).toMatchObject({ error: "body_too_large" });
  });
});

describe("POST /api/edge/heartbeat", () => {
  it("updates liveness and services in memory, writing zero rows", async () => {
    const r = router();
    const secret = await join(r, "coord-a", URL_A);
    const before = await r.stub().stats();
    const calls = { ...r.doCalls };
    for (let i = 0; i < 20; i++) {
      const resp = await beat(r, secret, edgeBeat("coord-a", { workers: i, load: 0.5 }));
      expect(resp.status).toBe(200);
    }
    const after = await r.stub().stats();
    expect(after.rows_written - before.rows_written).toBe(0);
    expect(after.database_size).toBe(before.database_size);
    expect((r.doCalls.heartbeat ?? 0) - (calls.heartbeat ?? 0)).toBe(20); // one DO request per beat
    expect(Object.keys(r.doCalls).sort()).toEqual(["heartbeat", "register", ...(calls.snapshot ? ["snapshot"] : [])].sort());
    const list = (await (await r.call("/api/coordinators")).json()) as { coordinators: Record<string, unknown>[] };
    expect(list.coordinators[0]).toMatchObject({ workers: 19, load: 0.5, services: [{ name: "echo", ready_workers: 2 }] });
  });

  it("answers 404 to an unknown id and 401 to a wrong or missing secret", async () => {
    const r = router();
    const secret = await join(r, "coord-a", URL_A);
    let resp = await beat(r, secret, edgeBeat("coord-zzz"));
    expect(resp.status).toBe(404);
    expect(await resp.json()).toMatchObject({ error: "unknown_coordinator", hop: "router" });
    resp = await beat(r, null, edgeBeat("coord-a"));
    expect(resp.status).toBe(401);
    resp = await beat(r, "wrong-secret-0123456789", edgeBeat("coord-a"));
    expect(resp.status).toBe(401);
    expect(await resp.json()).toMatchObject({ error: "unauthorized" });
    resp = await beat(r, secret, { coordinator_id: "coord-a", load: 7 });
    expect(resp.status).toBe(422);
  });

  it("takes a draining coordinator out of routing", async () => {
    const r = router();
    const secret = await join(r, "coord-a", URL_A);
    await beat(r, secret, edgeBeat("coord-a", { state: "draining" }));
    const health = (await (await r.call("/health")).json()) as { coordinators: { healthy: number } };
    expect(health.coordinators.healthy).toBe(0);
    expect((await r.call("/service/echo/x")).status).toBe(503);
  });
});

describe("DELETE /api/edge/{id}", () => {
  it("needs the coordinator's secret or the admin token", async () => {
    const r = router({ ADMIN_TOKEN: "admin-token-0123456789" });
    const secret = await join(r, "coord-a", URL_A);
    net.coordinator("https://b.trycloudflare.com", "coord-b");
    const secretB = await join(r, "coord-b", "https://b.trycloudflare.com");
    const del = (id: string, token?: string) =>
      r.call(`/api/edge/${id}`, { method: "DELETE", headers: token ? { Authorization: `Bearer ${token}` } : {} });
    expect((await del("coord-a")).status).toBe(401);
    expect((await del("coord-a", secretB)).status).toBe(401);
    expect((await del("coord-a", "admin-token-wrong")).status).toBe(401);
    expect((await del("bad id!", secret)).status).toBe(400);
    expect((await del("coord-zzz", secret)).status).toBe(404);
    const before = await r.stub().stats();
    const ok = await del("coord-a", secret);
    expect(ok.status).toBe(200);
    expect(await ok.json()).toEqual({ removed: "coord-a" });
    expect((await r.stub().stats()).rows_written - before.rows_written).toBe(1);
    expect((await del("coord-b", "admin-token-0123456789")).status).toBe(200);
    const stats = await r.stub().stats();
    expect(stats.rows).toBe(0);
    expect(stats.alarm).toBeNull(); // no coordinators, no alarm
    expect((await beat(r, secret, edgeBeat("coord-a"))).status).toBe(404);
  });
});

describe("registry lifecycle", () => {
  it("arms the alarm only while coordinators exist and evicts after the TTL (fake clock)", async () => {
    const r = router();
    expect((await r.stub().stats()).alarm).toBeNull();
    const secret = await join(r, "coord-a", URL_A);
    expect((await r.stub().stats()).alarm).not.toBeNull();
    const t0 = Date.now();
    await runInDurableObject(r.stub(), (o: Registry) => {
      o.clock = () => t0 + 60_000; // past COORDINATOR_TTL (30 s), before EVICT_AFTER (120 s)
    });
    const list = (await (await r.call("/api/coordinators")).json()) as { coordinators: { healthy: boolean }[] };
    expect(list.coordinators[0]?.healthy).toBe(false);
    expect((await r.call("/service/echo/x")).status).toBe(503);
    expect(await runDurableObjectAlarm(r.stub())).toBe(true);
    expect((await r.stub().stats()).rows).toBe(1);
    await runInDurableObject(r.stub(), (o: Registry) => {
      o.clock = () => t0 + 121_000;
    });
    const before = await r.stub().stats();
    expect(await runDurableObjectAlarm(r.stub())).toBe(true);
    const after = await r.stub().stats();
    expect(after.rows).toBe(0);
    expect(after.rows_written - before.rows_written).toBe(1);
    expect(after.alarm).toBeNull();
    expect((await beat(r, secret, edgeBeat("coord-a"))).status).toBe(404); // the agent re-registers
  });

  it("after a restart, rebuilds liveness from beats and evicts the silent after the TTL", async () => {
    const r = router();
    const secretA = await join(r, "coord-a", URL_A);
    net.coordinator("https://b.trycloudflare.com", "coord-b");
    await join(r, "coord-b", "https://b.trycloudflare.com");
    const t0 = Date.now();
    await runInDurableObject(r.stub(), (o: Registry) => {
      o.load(); // what the constructor does after an eviction from memory
    });
    let list = (await (await r.call("/api/coordinators")).json()) as { coordinators: { services: unknown[]; coordinator_id: string }[] };
    expect(list.coordinators.map((c) => c.services)).toEqual([[], []]);
    expect((await beat(r, secretA, edgeBeat("coord-a"))).status).toBe(200);
    await runInDurableObject(r.stub(), (o: Registry) => {
      o.clock = () => t0 + 31_000;
    });
    await runDurableObjectAlarm(r.stub());
    list = (await (await r.call("/api/coordinators")).json()) as typeof list;
    expect(list.coordinators.map((c) => c.coordinator_id)).toEqual(["coord-a"]);
  });
});
