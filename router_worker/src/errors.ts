/** Every error the router answers: `{"error": code, "detail": ..., "hop": "router"}`. */

export function jsonResponse(body: unknown, status = 200, headers?: HeadersInit): Response {
  const h = new Headers(headers);
  h.set("Content-Type", "application/json");
  h.set("Cache-Control", "no-store");
  return new Response(JSON.stringify(body), { status, headers: h });
}

export function jsonError(
  status: number,
  error: string,
  detail: unknown = null,
  headers?: HeadersInit,
): Response {
  return jsonResponse({ error, detail, hop: "router" }, status, headers);
}

/** Thrown by request parsing; the entry point turns it into its response. */
export class HttpError extends Error {
  constructor(readonly response: Response) {
    super(`HTTP ${response.status}`);
  }
}

export function fail(status: number, error: string, detail: unknown = null, headers?: HeadersInit): never {
  throw new HttpError(jsonError(status, error, detail, headers));
}
