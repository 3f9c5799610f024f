/**
 * Forwarding to coordinators: streaming passthrough, retries on the next candidate, passive health.
 *
 * An attempt fails "before any response byte" when fetch() throws (refused, reset, DNS, timeout)
 * or the answer is one a dead or saturated tunnel gives (429, 502, 503, 520-524, 530 — Cloudflare's
 * error 1033 arrives as 530). Such an attempt is retried on the next candidate when the request
 * has no body or a body the router could buffer (at most RETRY_BODY_MAX_BYTES).
 */
import { jsonError } from "./errors";
import type { CoordinatorView } from "./geo";

export const RETRY_STATUSES: ReadonlySet<number> = new Set([429, 502, 503, 520, 521, 522, 523, 524, 530]);

/** Hop-by-hop headers (RFC 9110 §7.6.1) and headers only the edge itself sets. */
const DROP = new Set([
  "connection",
  "keep-alive",
  "proxy-authenticate",
  "proxy-authorization",
  "proxy-connection",
  "te",
  "trailer",
  "trailers",
  "transfer-encoding",
  "upgrade",
  "host",
  "content-length",
  "x-forwarded-for",
  "x-forwarded-proto",
  "x-forwarded-host",
  "x-real-ip",
  "forwarded",
]);

const REQUEST_ID = /^[A-Za-z0-9._:-]{1,128}$/;

export function requestId(request: Request): string {
  const given = request.headers.get("X-Request-Id");
  return given !== null && REQUEST_ID.test(given) ? given : crypto.randomUUID();
}

/** End-to-end headers of `request`, without hop-by-hop, internal (`x-rma-*`) or `cf-*` ones. */
export function forwardHeaders(
  request: Request,
  rid: string,
  opts: { keepUpgrade?: boolean; strip?: readonly string[] } = {},
): Headers {
  const out = new Headers();
  const connectionListed = new Set(
    (request.headers.get("Connection") ?? "")
      .split(",")
      .map((s) => s.trim().toLowerCase())
      .filter((s) => s.length > 0 && !(opts.keepUpgrade === true && s === "upgrade")),
  );
  const strip = new Set((opts.strip ?? []).map((s) => s.toLowerCase()));
  for (const [name, value] of request.headers) {
    const k = name.toLowerCase();
    if (k === "upgrade" && opts.keepUpgrade === true) {
      out.set(name, value);
      continue;
    }
    if (DROP.has(k) || connectionListed.has(k) || strip.has(k)) continue;
    if (k.startsWith("x-rma-") || k.startsWith("cf-")) continue;
    out.set(name, value);
  }
  if (opts.keepUpgrade === true) out.set("Connection", "Upgrade");
  const ip = request.headers.get("CF-Connecting-IP");
  if (ip !== null) out.set("X-Forwarded-For", ip);
  out.set("X-Forwarded-Proto", new URL(request.url).protocol.replace(":", ""));
  out.set("X-Request-Id", rid);
  return out;
}

export interface Attempt {
  coordinator_id: string;
  status?: number;
  error?: string;
}

export type Body = { kind: "none" } | { kind: "buffered"; bytes: ArrayBuffer } | { kind: "stream"; stream: ReadableStream };

/** The body, buffered when it is at most `limit` bytes (so that it can be sent twice). */
export async function prepareBody(request: Request, limit: number): Promise<Body> {
  if (request.body === null || request.method === "GET" || request.method === "HEAD") return { kind: "none" };
  const declared = request.headers.get("Content-Length");
  if (declared !== null && Number(declared) > limit) return { kind: "stream", stream: request.body };
  const reader = request.body.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    size += value.byteLength;
    if (size > limit) {
      // Too big to retry: send what was read, then the rest, once.
      const { readable, writable } = new TransformStream<Uint8Array, Uint8Array>();
      const pump = async (): Promise<void> => {
        const writer = writable.getWriter();
        try {
          for (const c of chunks) await writer.write(c);
          for (;;) {
            const next = await reader.read();
            if (next.done) break;
            await writer.write(next.value);
          }
          await writer.close();
        } catch (err) {
          await writer.abort(err).catch(() => undefined);
        }
      };
      void pump();
      return { kind: "stream", stream: readable };
    }
  }
  const bytes = new Uint8Array(size);
  let offset = 0;
  for (const c of chunks) {
    bytes.set(c, offset);
    offset += c.byteLength;
  }
  return { kind: "buffered", bytes: bytes.buffer };
}

export interface ForwardOptions {
  method: string;
  /** Path and query on the coordinator, starting with "/". */
  pathAndQuery: string;
  headers: Headers;
  body: Body;
  /** Abort an attempt that has no response headers after this many ms (0: no limit). */
  timeoutMs: number;
  /** Give up after this many candidates. */
  attempts: number;
  /** Called for every failed attempt (passive health). */
  onFailure: (c: CoordinatorView, attempt: Attempt) => void;
}

export type ForwardResult =
  | { ok: true; response: Response; coordinator: CoordinatorView; attempts: Attempt[] }
  | { ok: false; attempts: Attempt[]; lastResponse: Response | null };

async function fetchWithTimeout(url: string, init: RequestInit, timeoutMs: number): Promise<Response> {
  if (timeoutMs <= 0) return fetch(url, init);
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(new Error(`no response headers within ${timeoutMs} ms`)), timeoutMs);
  try {
    return await fetch(url, { ...init, signal: controller.signal });
  } finally {
    clearTimeout(timer);
  }
}

/** Try `candidates` in order; a failure before response headers moves on when the body allows. */
export async function forward(candidates: readonly CoordinatorView[], opts: ForwardOptions): Promise<ForwardResult> {
  const attempts: Attempt[] = [];
  let lastResponse: Response | null = null;
  const retryable = opts.body.kind !== "stream";
  const limit = retryable ? Math.min(opts.attempts, candidates.length) : Math.min(1, candidates.length);
  for (let i = 0; i < limit; i++) {
    const c = candidates[i] as CoordinatorView;
    const init: RequestInit = { method: opts.method, headers: opts.headers, redirect: "manual" };
    if (opts.body.kind === "buffered") init.body = opts.body.bytes;
    else if (opts.body.kind === "stream") init.body = opts.body.stream;
    let response: Response;
    try {
      response = await fetchWithTimeout(c.url + opts.pathAndQuery, init, opts.timeoutMs);
    } catch (err) {
      const attempt = { coordinator_id: c.id, error: err instanceof Error ? err.message.slice(0, 200) : String(err) };
      attempts.push(attempt);
      opts.onFailure(c, attempt);
      continue;
    }
    if (RETRY_STATUSES.has(response.status)) {
      const attempt = { coordinator_id: c.id, status: response.status };
      attempts.push(attempt);
      opts.onFailure(c, attempt);
      if (lastResponse !== null) await lastResponse.body?.cancel().catch(() => undefined);
      lastResponse = response;
      continue;
    }
    if (lastResponse !== null) await lastResponse.body?.cancel().catch(() => undefined);
    attempts.push({ coordinator_id: c.id, status: response.status });
    return { ok: true, response, coordinator: c, attempts };
  }
  return { ok: false, attempts, lastResponse };
}

/** The router's answer when every candidate failed. */
export async function exhausted(result: { attempts: Attempt[]; lastResponse: Response | null }, what: string): Promise<Response> {
  await result.lastResponse?.body?.cancel().catch(() => undefined);
  const saturated =
    result.attempts.length > 0 && result.attempts.every((a) => a.status === 429 || a.status === 503);
  if (saturated) {
    return jsonError(503, "no_capacity", { message: `every coordinator tried for ${what} is saturated`, attempts: result.attempts }, { "Retry-After": "1" });
  }
  return jsonError(502, "upstream_unavailable", { message: `no coordinator answered ${what}`, attempts: result.attempts }, { "Retry-After": "1" });
}
