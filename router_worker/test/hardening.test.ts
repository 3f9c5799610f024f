/** Findings of the router audit against issue 4: each test failed before its fix. */
import { createExecutionContext, runInDurableObject, waitOnExecutionContext } from "cloudflare:test";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import worker from "../src/index";
import { MAX_COORDINATORS, type Env } from "../src/env";
import type { Registry } from "../src/registry";
import { limiter, resetReports } from "../src/service";
import { resetIsolateState } from "../src/snapshot";
import { CF_LONDON, edgeBeat, FakeNet, join, register, router } from "./helpers";

const LON = "https://lon.trycloudflare.com";
const WORKER = JSON.stringify({ worker_type: "cpu", tunnel_url: "https://w1.trycloudflare.com", services: [{ name: "echo" }] });
let net: FakeNet;

beforeEach(() => {
  resetIsolateState();
  resetReports();
  limiter.clear();
  net = new FakeNet().install();
});
afterEach(() => {
  vi.restoreAllMocks();
});

async function callWith(env: Env, path: string, init: RequestInit & { cf?: Record<string, unknown> } = {}): Promise<Response> {
  const { cf, ...rest } = init;
  const ctx = createExecutionContext();
  const resp = await worker.fetch(new Request(`https://api.rmatool.org.uk${path}`, { ...rest, cf } as RequestInit) as Request<unknown, IncomingRequestCfProperties>, env, ctx);
  await waitOnExecutionContext(ctx);
  return resp;
}

describe("the router never follows a coordinator's redirect", () => {
  it("fetches with redirect: manual on every path, WebSocket upgrades included", async () => {
    const r = router();
    net.coordinator(LON, "lon");
    await join(r, "lon", LON, CF_LONDON);
    net.handlers.set(LON, () => new Response(null, { status: 302, headers: { Location: "https://169.254.169.254/latest/meta-data" } }));
    await r.call("/service/echo/x", { cf: CF_LONDON });
    const ws = await r.call("/service/echo/ws", { headers: { Upgrade: "websocket" }, cf: CF_LONDON });
    expect(ws.status).toBe(302); // handed to the client, not followed by the router
    expect(net.seen.map((s) => new URL(s.url).pathname)).toEqual(["/health", "/service/echo/x", "/service/echo/ws"]);
    for (const s of net.seen) expect([s.url, s.redirect]).toEqual([s.url, "manual"]);
  });
});

describe("registration health check", () => {
  it("reads at most a capped /health body from the URL under test", async () => {
    const r = router();
    let pulled = 0;
    net.handlers.set(LON, () => {
      const chunk = new TextEncoder().encode(`{"coordinator_id":"lon","pad":"${"x".repeat(65_000)}`);
      const body = new ReadableStream<Uint8Array>({
        pull(controller) {
          if (pulled >= 8 << 20) return controller.close();
          pulled += chunk.byteLength;
          controller.enqueue(chunk);
        },
      });
      return new Response(body, { headers: { "Content-Type": "application/json" } });
    });
    const resp = await register(r, "lon", LON);
    expect(resp.status).toBe(502);
    expect(await resp.json()).toMatchObject({ error: "health_check_failed", hop: "router" });
    expect(pulled).toBeLessThan(512 * 1024);
  });
});

describe("when the registry Durable Object fails", () => {
  it("answers 503 registry_unavailable JSON, never a bare 500", async () => {
    const r = router();
    net.coordinator(LON, "lon");
    const secret = await join(r, "lon", LON, CF_LONDON);
    r.broken.add("snapshot").add("heartbeat").add("register").add("remove");
    for (const [path, init] of [
      ["/service/echo/x", { cf: CF_LONDON }],
      ["/health", {}],
      ["/api/coordinators", {}],
      ["/api/worker/register", { method: "POST", body: WORKER }],
      ["/api/edge/heartbeat", { method: "POST", headers: { Authorization: `Bearer ${secret}` }, body: JSON.stringify(edgeBeat("lon")) }],
      ["/api/edge/register", { method: "POST", body: JSON.stringify({ coordinator_id: "lon", tunnel_url: LON, coordinator_secret: secret }) }],
      ["/api/edge/lon", { method: "DELETE", headers: { Authorization: `Bearer ${secret}` } }],
    ] as const) {
      const resp = await r.call(path, init as RequestInit);
      expect([path, resp.status]).toEqual([path, 503]);
      expect(resp.headers.get("Retry-After")).not.toBeNull();
      expect(await resp.json()).toMatchObject({ error: "registry_unavailable", hop: "router" });
    }
  });

  it("keeps routing public requests from the last snapshot it held", async () => {
    const r = router({ SNAPSHOT_TTL_MS: "1" });
    net.coordinator(LON, "lon");
    await join(r, "lon", LON, CF_LONDON);
    expect((await r.call("/service/echo/x", { cf: CF_LONDON })).status).toBe(200);
    await new Promise((resolve) => setTimeout(resolve, 20)); // the snapshot is past SNAPSHOT_TTL_MS
    r.broken.add("snapshot");
    const resp = await r.call("/service/echo/x", { cf: CF_LONDON });
    expect(resp.status).toBe(200);
    expect(resp.headers.get("X-Rma-Coordinator")).toBe("lon");
  });
});

describe("registry size", () => {
  it("refuses new coordinator ids beyond its cap, making room by evicting expired ones", async () => {
    const r = router();
    const loc = { lat: null, lon: null, country: null, continent: null, colo: null };
    const reg = (id: string, secret: string | null = null) =>
      r.stub().register({ id, tunnelUrl: `https://${id}.trycloudflare.com`, secret, loc, version: null, maxCoordinators: 2 });
    const first = await reg("c1");
    expect(first.ok).toBe(true);
    expect((await reg("c2")).ok).toBe(true);
    expect(await reg("c3")).toEqual({ ok: false, error: "full" });
    expect((await r.stub().stats()).rows).toBe(2);
    // the owner of a registered id still re-registers
    expect((await reg("c1", first.ok ? first.secret : null)).ok).toBe(true);
    // expired entries give their place up
    const t = Date.now() + 121_000;
    await runInDurableObject(r.stub(), (o: Registry) => {
      o.clock = () => t;
    });
    expect((await reg("c3")).ok).toBe(true);
    expect((await r.stub().stats()).rows).toBe(1);
  });

  it(`answers 503 registry_full through the Worker once ${MAX_COORDINATORS} coordinators are registered`, async () => {
    const r = router();
    await runInDurableObject(r.stub(), async (o: Registry) => {
      const loc = { lat: null, lon: null, country: null, continent: null, colo: null };
      for (let i = 0; i < MAX_COORDINATORS; i++) {
        await o.register({ id: `c${i}`, tunnelUrl: `https://c${i}.trycloudflare.com`, secret: null, loc, version: null });
      }
    });
    net.coordinator(LON, "lon");
    const full = await register(r, "lon", LON);
    expect(full.status).toBe(503);
    expect(full.headers.get("Retry-After")).not.toBeNull();
    expect(await full.json()).toMatchObject({ error: "registry_full", hop: "router" });
  });
});

describe("stored tunnel URLs", () => {
  it("are checked against the current policy before they are fetched", async () => {
    const dev = router({ DEV_ALLOW_LOOPBACK: "true" });
    net.coordinator("http://127.0.0.1:8080", "loop");
    await join(dev, "loop", "http://127.0.0.1:8080", CF_LONDON);
    expect((await dev.call("/service/echo/x", { cf: CF_LONDON })).status).toBe(200);
    resetIsolateState();
    net.seen.length = 0;
    // the same registry, after the operator turned dev mode off
    const prod: Env = { ...dev.env, DEV_ALLOW_LOOPBACK: "false" };
    expect((await callWith(prod, "/service/echo/x", { cf: CF_LONDON })).status).toBe(503);
    expect((await callWith(prod, "/api/worker/register", { method: "POST", body: WORKER, cf: CF_LONDON })).status).toBe(503);
    expect(net.seen).toHaveLength(0);
  });
});

describe("registry concurrency (already held: a guard, not a fix)", () => {
  it("gives a new id to exactly one of two concurrent registrations", async () => {
    const r = router();
    const loc = { lat: null, lon: null, country: null, continent: null, colo: null };
    const reg = (secret: string) =>
      r.stub().register({ id: "contested", tunnelUrl: "https://contested.trycloudflare.com", secret, loc, version: null });
    const results = await Promise.all([reg("a".repeat(32)), reg("b".repeat(32)), reg("c".repeat(32))]);
    expect(results.filter((x) => x.ok)).toHaveLength(1);
    const winner = results.find((x) => x.ok);
    const secret = winner?.ok ? winner.secret : "";
    expect(await r.stub().heartbeat(secret, { coordinator_id: "contested" })).toBe("ok");
  });
});

describe("WebSocket upgrades and passive health", () => {
  it("count a dead tunnel's answer (530) to an upgrade against that coordinator", async () => {
    const r = router();
    net.coordinator(LON, "lon");
    await join(r, "lon", LON, CF_LONDON);
    net.handlers.set(LON, () => new Response("error code: 1033", { status: 530 }));
    for (const k of Object.keys(r.doCalls)) delete r.doCalls[k];
    const resp = await r.call("/service/echo/ws", { headers: { Upgrade: "websocket" }, cf: CF_LONDON });
    expect(resp.status).toBe(530);
    expect(r.doCalls.reportFailure).toBe(1);
  });
});
