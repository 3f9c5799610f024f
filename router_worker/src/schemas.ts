/**
 * Request bodies are validated against the JSON Schemas exported from the coordinator's pydantic
 * models (coordinator/schemas/*.json, bundled by wrangler). Payload shapes are never redefined
 * here: the TypeScript types below only name the fields the router reads.
 */
import { Validator, type Schema } from "@cfworker/json-schema";
import edgeHeartbeatSchema from "../../coordinator/schemas/edge_heartbeat_request.json";
import edgeRegisterSchema from "../../coordinator/schemas/edge_register_request.json";
import workerHeartbeatSchema from "../../coordinator/schemas/worker_heartbeat_request.json";
import workerRegisterSchema from "../../coordinator/schemas/worker_register_request.json";
import { fail } from "./errors";

export const PROTOCOL_VERSION = 1;
export const ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
export const SERVICE_PATTERN = /^[a-z0-9][a-z0-9._-]{0,63}$/;
/** Largest control-plane body (register/heartbeat), as the coordinator's MAX_CONTROL_BODY. */
export const MAX_CONTROL_BODY = 64 * 1024;

export interface EdgeServiceSummary {
  name: string;
  ready_workers: number;
  models?: string[];
  aliases?: string[];
}
export interface EdgeRegisterRequest {
  protocol_version?: number;
  coordinator_id: string;
  tunnel_url: string;
  coordinator_secret?: string | null;
  version?: string | null;
}
export interface EdgeHeartbeatRequest {
  protocol_version?: number;
  coordinator_id: string;
  state?: "active" | "draining";
  workers?: number;
  services?: EdgeServiceSummary[];
  load?: number;
  in_flight?: number;
}
export interface WorkerRegisterRequest {
  protocol_version?: number;
  worker_id?: string | null;
}
export interface WorkerHeartbeatRequest {
  protocol_version?: number;
  worker_id: string;
  coordinator_id?: string | null;
}

function validator(schema: unknown): Validator {
  return new Validator(schema as Schema, "2020-12", false);
}

export const VALIDATORS = {
  edgeRegister: validator(edgeRegisterSchema),
  edgeHeartbeat: validator(edgeHeartbeatSchema),
  workerRegister: validator(workerRegisterSchema),
  workerHeartbeat: validator(workerHeartbeatSchema),
} as const;

export type SchemaName = keyof typeof VALIDATORS;

/** The body as bytes, at most `limit` of them (413 beyond), whatever Content-Length claims. */
export async function readCapped(request: Request, limit: number): Promise<Uint8Array> {
  const declared = request.headers.get("Content-Length");
  if (declared !== null && Number(declared) > limit) fail(413, "body_too_large", `at most ${limit} bytes`);
  const bytes = await readStreamCapped(request.body, limit);
  if (bytes === null) fail(413, "body_too_large", `at most ${limit} bytes`);
  return bytes;
}

/** A stream's bytes, or null (and the stream cancelled) once it passes `limit` bytes. */
export async function readStreamCapped(body: ReadableStream<Uint8Array> | null, limit: number): Promise<Uint8Array | null> {
  if (body === null) return new Uint8Array();
  const reader = body.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > limit) {
      await reader.cancel().catch(() => undefined);
      return null;
    }
    chunks.push(value);
  }
  const out = new Uint8Array(size);
  let offset = 0;
  for (const chunk of chunks) {
    out.set(chunk, offset);
    offset += chunk.byteLength;
  }
  return out;
}

/** Parse and validate `raw` against the exported schema: 400 on bad JSON, 422 on bad shape. */
export function parseBody<T>(raw: Uint8Array, name: SchemaName): T {
  let data: unknown;
  try {
    data = JSON.parse(new TextDecoder("utf-8", { fatal: true, ignoreBOM: false }).decode(raw));
  } catch (err) {
    fail(400, "invalid_json", err instanceof Error ? err.message : "the body is not JSON");
  }
  const result = VALIDATORS[name].validate(data);
  if (!result.valid) {
    const detail = result.errors
      .filter((e) => e.keyword !== "properties" && e.keyword !== "$ref" && e.keyword !== "items")
      .slice(0, 20)
      .map((e) => ({ loc: e.instanceLocation, msg: e.error }));
    fail(422, "invalid_request", detail.length > 0 ? detail : result.errors.slice(0, 5).map((e) => ({ loc: e.instanceLocation, msg: e.error })));
  }
  const version = (data as { protocol_version?: number }).protocol_version ?? PROTOCOL_VERSION;
  if (version !== PROTOCOL_VERSION) {
    fail(400, "unsupported_protocol_version", `this router speaks protocol_version ${PROTOCOL_VERSION}`);
  }
  return data as T;
}
