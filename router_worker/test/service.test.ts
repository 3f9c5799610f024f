import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { limiter, resetReports } from "../src/service";
import { resetIsolateState } from "../src/snapshot";
import { CF_LONDON, CF_NEW_YORK, CF_PARIS, CF_TOKYO, FakeNet, join, router, type Handler } from "./helpers";

const LON = "https://lon.trycloudflare.com";
const PAR = "https://par.trycloudflare.com";
const NYC = "https://nyc.trycloudflare.com";
let net: FakeNet;

function echo(id: string): Handler {
  return async (req) => {
    const url = new URL(req.url);
    return Response.json(
      { coordinator: id, method: req.method, path: url.pathname, query: url.search, body: req.method === "GET" ? "" : await req.text() },
      { headers: { "X-From": id } },
    );
  };
}

async function fleet(overrides: Record<string, string> = {}) {
  const r = router(overrides);
  net.coordinator(LON, "lon", echo("lon")).coordinator(PAR, "par", echo("par")).coordinator(NYC, "nyc", echo("nyc"));
  const secrets = {
    lon: await join(r, "lon", LON, CF_LONDON),
    par: await join(r, "par", PAR, CF_PARIS),
    nyc: await join(r, "nyc", NYC, CF_NEW_YORK),
  };
  net.seen.length = 0;
  return { r, secrets };
}

beforeEach(() => {
  resetIsolateState();
  resetReports();
  limiter.clear();
  net = new FakeNet().install();
});
afterEach(() => {
  vi.restoreAllMocks();
});

describe("ANY /service/{name}/{path}", () => {
  it("goes to the nearest coordinator, keeping method, path, query and body", async () => {
    const { r } = await fleet();
    let resp = await r.call("/service/echo/v1/chat?stream=true&x=%20y", { method: "POST", body: '{"model":"m"}', cf: CF_PARIS });
    expect(resp.status).toBe(200);
    expect(resp.headers.get("X-Rma-Coordinator")).toBe("par");
    expect(await resp.json()).toEqual({ coordinator: "par", method: "POST", path: "/service/echo/v1/chat", query: "?stream=true&x=%20y", body: '{"model":"m"}' });
    resp = await r.call("/service/echo/", { cf: CF_NEW_YORK });
    expect(((await resp.json()) as { coordinator: string }).coordinator).toBe("nyc");
    resp = await r.call("/service/echo/x", { cf: CF_TOKYO });
    expect(resp.status).toBe(200); // nobody in Asia: still served
    resp = await r.call("/service/echo/x", { cf: { country: "FR", continent: "EU" } });
    expect(((await resp.json()) as { coordinator: string }).coordinator).toBe("par");
  });

  it("sets X-Request-Id, drops hop-by-hop, internal and cf headers", async () => {
    const { r } = await fleet();
    const resp = await r.call("/service/echo/h", {
      headers: {
        Connection: "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "1",
        "Keep-Alive": "timeout=5",
        "X-RMA-Gateway-Key": "forged",
        "X-Custom": "kept",
        "CF-Connecting-IP": "203.0.113.9",
        "X-Forwarded-For": "1.2.3.4",
      },
      cf: CF_LONDON,
    });
    expect(resp.status).toBe(200);
    const rid = resp.headers.get("X-Request-Id");
    expect(rid).toMatch(/^[0-9a-f-]{36}$/);
    const sent = net.seen[0]?.headers as Headers;
    expect(sent.get("X-Request-Id")).toBe(rid);
    expect(sent.get("X-Custom")).toBe("kept");
    expect(sent.get("X-Secret-Hop")).toBeNull();
    expect(sent.get("Keep-Alive")).toBeNull();
    expect(sent.get("X-RMA-Gateway-Key")).toBeNull();
    expect(sent.get("X-Forwarded-For")).toBe("203.0.113.9");
    const again = await r.call("/service/echo/h", { headers: { "X-Request-Id": "abc-123" }, cf: CF_LONDON });
    expect(again.headers.get("X-Request-Id")).toBe("abc-123");
  });

  it("fails over when the nearest answers 530 (error 1033), and counts the failure", async () => {
    const { r } = await fleet();
    net.handlers.set(LON, () => new Response("error code: 1033", { status: 530 }));
    const resp = await r.call("/service/echo/x", { method: "POST", body: "payload", cf: CF_LONDON });
    expect(resp.status).toBe(200);
    expect(await resp.json()).toMatchObject({ coordinator: "par", body: "payload" });
    expect(r.doCalls.reportFailure).toBe(1);
    const admin = await r.stub().snapshot();
    expect(admin.coordinators.find((c) => c.id === "lon")?.failures).toBeGreaterThan(0.9);
    // Passive health: the next request goes straight to Paris.
    net.seen.length = 0;
    await r.call("/service/echo/y", { cf: CF_LONDON });
    expect(net.seen.map((s) => new URL(s.url).origin)).toEqual([PAR]);
  });

  it.each([429, 502, 503, 524])("fails over on %i", async (status) => {
    const { r } = await fleet();
    net.handlers.set(LON, () => Response.json({ error: "busy" }, { status }));
    const resp = await r.call("/service/echo/x", { cf: CF_LONDON });
    expect(((await resp.json()) as { coordinator: string }).coordinator).toBe("par");
  });

  it("fails over when the connection is refused (a real refused loopback port)", async () => {
    const r = router({ DEV_ALLOW_LOOPBACK: "true" });
    const dead = "http://127.0.0.1:1";
    net.handlers.set(dead, (req) => (new URL(req.url).pathname === "/health" ? Response.json({ coordinator_id: "dead" }) : new Response("unused")));
    await join(r, "dead", dead, CF_LONDON);
    net.handlers.delete(dead); // now every fetch to it really goes to 127.0.0.1:1
    net.coordinator(PAR, "par", echo("par"));
    await join(r, "par", PAR, CF_PARIS);
    const resp = await r.call("/service/echo/x", { cf: CF_LONDON });
    expect(resp.status).toBe(200);
    expect(await resp.json()).toMatchObject({ coordinator: "par" });
  });

  it("does not retry a body it could not buffer, and answers 502 JSON when all fail", async () => {
    const { r } = await fleet({ RETRY_BODY_MAX_BYTES: "16" });
    net.handlers.set(LON, () => new Response("bad gateway", { status: 502 }));
    const resp = await r.call("/service/echo/x", { method: "POST", body: "x".repeat(100), cf: CF_LONDON });
    expect(resp.status).toBe(502);
    expect(await resp.json()).toMatchObject({ error: "upstream_unavailable", hop: "router", detail: { attempts: [{ coordinator_id: "lon", status: 502 }] } });
    net.handlers.set(PAR, () => Response.json({ error: "no_worker" }, { status: 503 }));
    net.handlers.set(NYC, () => Response.json({ error: "no_worker" }, { status: 429 }));
    net.handlers.set(LON, () => Response.json({ error: "no_worker" }, { status: 503 }));
    const busy = await r.call("/service/echo/x", { cf: CF_LONDON });
    expect(busy.status).toBe(503);
    expect(busy.headers.get("Retry-After")).toBe("1");
    expect(await busy.json()).toMatchObject({ error: "no_capacity", hop: "router" });
  });

  it("passes a coordinator's own 4xx/5xx answers through unchanged", async () => {
    const { r } = await fleet();
    net.handlers.set(LON, () => Response.json({ error: "not_found", hop: "worker" }, { status: 404 }));
    const resp = await r.call("/service/echo/x", { cf: CF_LONDON });
    expect(resp.status).toBe(404);
    expect(await resp.json()).toEqual({ error: "not_found", hop: "worker" });
  });

  it("streams the response as it arrives", async () => {
    const { r } = await fleet();
    let push!: (s: string) => void;
    let end!: () => void;
    const stream = new ReadableStream<Uint8Array>({
      start(controller) {
        const enc = new TextEncoder();
        push = (s) => controller.enqueue(enc.encode(s));
        end = () => controller.close();
      },
    });
    net.handlers.set(LON, () => new Response(stream, { headers: { "Content-Type": "text/event-stream" } }));
    push("data: token-0\n\n");
    const resp = await r.call("/service/echo/stream", { cf: CF_LONDON });
    expect(resp.headers.get("Content-Type")).toBe("text/event-stream");
    const reader = (resp.body as ReadableStream<Uint8Array>).getReader();
    const dec = new TextDecoder();
    expect(dec.decode((await reader.read()).value)).toBe("data: token-0\n\n"); // before the upstream ended
    push("data: token-1\n\n");
    expect(dec.decode((await reader.read()).value)).toBe("data: token-1\n\n");
    end();
    expect((await reader.read()).done).toBe(true);
  });

  it("routes an alias (llm) to the coordinators that report its service (llm-inference)", async () => {
    const r = router();
    net.coordinator(LON, "lon", echo("lon")).coordinator(PAR, "par", echo("par"));
    const llm = { services: [{ name: "llm-inference", ready_workers: 1, models: ["llama3"], aliases: ["llm"] }] };
    await join(r, "lon", LON, CF_LONDON);
    await join(r, "par", PAR, CF_PARIS, llm);
    const resp = await r.call("/service/llm/v1/chat/completions", { method: "POST", body: "{}", cf: CF_LONDON });
    expect(resp.status).toBe(200);
    expect(await resp.json()).toMatchObject({ coordinator: "par", path: "/service/llm/v1/chat/completions" });
  });

  it("when every coordinator known to offer the service fails, tries the other healthy ones", async () => {
    // Right after a failover the snapshot still says only the dead coordinator has the service.
    const r = router();
    net.coordinator(LON, "lon", echo("lon")).coordinator(PAR, "par", echo("par"));
    const ocr = { services: [{ name: "ocr", ready_workers: 1, models: [], aliases: [] }] };
    await join(r, "lon", LON, CF_LONDON, ocr);
    await join(r, "par", PAR, CF_PARIS); // reports echo only (its beat is older than the move)
    net.handlers.set(LON, () => new Response("error code: 1033", { status: 530 }));
    net.seen.length = 0;
    const resp = await r.call("/service/ocr/page", { cf: CF_LONDON });
    expect(resp.status).toBe(200);
    expect(await resp.json()).toMatchObject({ coordinator: "par", path: "/service/ocr/page" });
    expect(net.seen.map((s) => new URL(s.url).origin)).toEqual([LON, PAR]);
  });

  it("answers 503 JSON when no coordinator offers the service, 400 on a bad name", async () => {
    const { r } = await fleet();
    let resp = await r.call("/service/ollama/x", { cf: CF_LONDON });
    expect(resp.status).toBe(503);
    expect(await resp.json()).toMatchObject({ error: "no_coordinator", hop: "router" });
    resp = await r.call("/service/Bad%20Name/x");
    expect(resp.status).toBe(400);
    expect(await resp.json()).toMatchObject({ error: "invalid_service" });
  });

  it("costs about zero DO requests per public request with the snapshot cache", async () => {
    const { r } = await fleet({ SNAPSHOT_TTL_MS: "5000" });
    for (const k of Object.keys(r.doCalls)) delete r.doCalls[k];
    for (let i = 0; i < 50; i++) expect((await r.call("/service/echo/x", { cf: CF_LONDON })).status).toBe(200);
    expect(r.doCalls).toEqual({ snapshot: 1 });
    resetIsolateState(); // a new isolate in the same colo: the Cache API copy is used
    for (let i = 0; i < 10; i++) expect((await r.call("/service/echo/x", { cf: CF_LONDON })).status).toBe(200);
    expect(r.doCalls).toEqual({ snapshot: 1 });
  });

  it("needs an API key when API_KEYS is set, and never forwards it", async () => {
    const key = "public-key-0123456789";
    const digest = [...new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(key)))]
      .map((b) => b.toString(16).padStart(2, "0"))
      .join("");
    const { r } = await fleet({ API_KEYS: `sha256:${"0".repeat(64)}, ${digest}` });
    expect((await r.call("/service/echo/x")).status).toBe(401);
    expect((await r.call("/service/echo/x", { headers: { Authorization: "Bearer wrong" } })).status).toBe(401);
    let resp = await r.call("/service/echo/x", { headers: { Authorization: `Bearer ${key}` }, cf: CF_LONDON });
    expect(resp.status).toBe(200);
    resp = await r.call("/service/echo/x", { headers: { "X-API-Key": key }, cf: CF_LONDON });
    expect(resp.status).toBe(200);
    for (const s of net.seen) {
      expect(s.headers.get("Authorization")).toBeNull();
      expect(s.headers.get("X-API-Key")).toBeNull();
    }
  });

  it("rate-limits per client with 429 and Retry-After", async () => {
    const { r } = await fleet({ RATE_LIMIT_PER_MIN: "60", RATE_LIMIT_BURST: "3" });
    const ip = (v: string) => ({ headers: { "CF-Connecting-IP": v }, cf: CF_LONDON });
    for (let i = 0; i < 3; i++) expect((await r.call("/service/echo/x", ip("198.51.100.1"))).status).toBe(200);
    const limited = await r.call("/service/echo/x", ip("198.51.100.1"));
    expect(limited.status).toBe(429);
    expect(Number(limited.headers.get("Retry-After"))).toBeGreaterThanOrEqual(1);
    expect(await limited.json()).toMatchObject({ error: "rate_limited", hop: "router" });
    expect((await r.call("/service/echo/x", ip("198.51.100.2"))).status).toBe(200);
  });

  it("answers CORS preflights and decorates responses", async () => {
    const { r } = await fleet();
    const pre = await r.call("/service/echo/x", { method: "OPTIONS", headers: { Origin: "https://app.example", "Access-Control-Request-Method": "POST" } });
    expect(pre.status).toBe(204);
    expect(pre.headers.get("Access-Control-Allow-Origin")).toBe("*");
    expect(pre.headers.get("Access-Control-Allow-Methods")).toContain("POST");
    const resp = await r.call("/service/echo/x", { headers: { Origin: "https://app.example" }, cf: CF_LONDON });
    expect(resp.headers.get("Access-Control-Allow-Origin")).toBe("*");
    const strict = router({ CORS_ALLOW_ORIGINS: "https://ok.example" });
    const denied = await strict.call("/service/echo/x", { method: "OPTIONS", headers: { Origin: "https://evil.example", "Access-Control-Request-Method": "GET" } });
    expect(denied.headers.get("Access-Control-Allow-Origin")).toBeNull();
  });

  it("passes WebSocket upgrades through unchanged", async () => {
    const { r } = await fleet();
    net.handlers.set(LON, (req) => {
      expect(req.headers.get("Upgrade")).toBe("websocket");
      const pair = new WebSocketPair();
      pair[1].accept();
      pair[1].addEventListener("message", (e) => pair[1].send(`echo:${String(e.data)}`));
      return new Response(null, { status: 101, webSocket: pair[0] });
    });
    const resp = await r.call("/service/echo/ws", { headers: { Upgrade: "websocket" }, cf: CF_LONDON });
    expect(resp.status).toBe(101);
    const ws = resp.webSocket as WebSocket;
    ws.accept();
    const got = new Promise<string>((resolve) => ws.addEventListener("message", (e) => resolve(String(e.data))));
    ws.send("hi");
    expect(await got).toBe("echo:hi");
    ws.close();
  });
});

describe("workers through the router", () => {
  const workerBody = { worker_type: "cpu", tunnel_url: "https://w1.trycloudflare.com", services: [{ name: "echo" }] };

  it("forwards a registration to the nearest healthy coordinator, failing over", async () => {
    const { r } = await fleet();
    const reply = (id: string): Handler => (req) =>
      Response.json({ worker_id: "w-1", worker_token: "t".repeat(32), coordinator_id: id, coordinator_url: new URL(req.url).origin, assigned_services: ["echo"], heartbeat_interval: 5 });
    net.coordinator(PAR, "par", reply("par"));
    net.handlers.set(LON, () => new Response("error code: 1033", { status: 530 }));
    for (const k of Object.keys(r.doCalls)) delete r.doCalls[k];
    const resp = await r.call("/api/worker/register", { method: "POST", body: JSON.stringify(workerBody), headers: { Authorization: "Bearer join" }, cf: CF_LONDON });
    expect(resp.status).toBe(200);
    expect(await resp.json()).toMatchObject({ coordinator_id: "par", coordinator_url: PAR });
    const sent = net.seen.at(-1);
    expect(sent?.url).toBe(`${PAR}/api/worker/register`);
    expect(JSON.parse(sent?.body ?? "{}")).toEqual(workerBody);
    expect(sent?.headers.get("Authorization")).toBe("Bearer join"); // the coordinator's WORKER_JOIN_TOKEN
    expect(r.doCalls).toEqual({ snapshot: 1, reportFailure: 1 });
  });

  it("answers 503 with no coordinator, 422 on a bad body, and passes 4xx through", async () => {
    const empty = router();
    let resp = await empty.call("/api/worker/register", { method: "POST", body: JSON.stringify(workerBody) });
    expect(resp.status).toBe(503);
    expect(await resp.json()).toMatchObject({ error: "no_coordinator", hop: "router" });
    resp = await empty.call("/api/worker/register", { method: "POST", body: JSON.stringify({ worker_type: "tpu", tunnel_url: "x" }) });
    expect(resp.status).toBe(422);
    const { r } = await fleet();
    net.handlers.set(LON, () => Response.json({ error: "unauthorized", hop: "coordinator" }, { status: 401 }));
    resp = await r.call("/api/worker/register", { method: "POST", body: JSON.stringify(workerBody), cf: CF_LONDON });
    expect(resp.status).toBe(401);
    expect(await resp.json()).toMatchObject({ hop: "coordinator" });
  });

  it("routes a heartbeat by coordinator_id, 404 when unknown, 502 when it is down", async () => {
    const { r } = await fleet();
    const beat = (cid?: string) =>
      r.call("/api/worker/heartbeat", { method: "POST", headers: { Authorization: "Bearer tok" }, body: JSON.stringify({ worker_id: "w-1", ...(cid ? { coordinator_id: cid } : {}) }), cf: CF_TOKYO });
    let resp = await beat("nyc");
    expect(resp.status).toBe(200);
    expect(await resp.json()).toMatchObject({ coordinator: "nyc", path: "/api/worker/heartbeat" });
    expect(net.seen.at(-1)?.headers.get("Authorization")).toBe("Bearer tok");
    resp = await beat("gone");
    expect(resp.status).toBe(404);
    expect((await beat()).status).toBe(404);
    net.handlers.delete(NYC);
    resp = await beat("nyc");
    expect(resp.status).toBe(502);
    expect(await resp.json()).toMatchObject({ error: "upstream_unavailable", hop: "router" });
  });
});

describe("routing and views", () => {
  it("answers JSON 404 and 405", async () => {
    const r = router();
    let resp = await r.call("/nope");
    expect(resp.status).toBe(404);
    expect(await resp.json()).toMatchObject({ error: "not_found", hop: "router" });
    resp = await r.call("/api/edge/register");
    expect(resp.status).toBe(405);
    expect(resp.headers.get("Allow")).toBe("POST");
    resp = await r.call("/api/edge/%E0%A4%A", { method: "DELETE" });
    expect(resp.status).toBe(400);
  });

  it("shows URLs and locations only to the admin", async () => {
    const { r } = await fleet({ ADMIN_TOKEN: "admin-token-0123456789" });
    const pub = await (await r.call("/api/coordinators")).text();
    expect(pub).not.toContain("trycloudflare");
    const admin = await (await r.call("/api/coordinators", { headers: { Authorization: "Bearer admin-token-0123456789" } })).json();
    expect(JSON.stringify(admin)).toContain(LON);
    const health = await (await r.call("/health")).json();
    expect(health).toMatchObject({ status: "ok", coordinators: { registered: 3, healthy: 3 }, services: { echo: 6 } });
  });
});
