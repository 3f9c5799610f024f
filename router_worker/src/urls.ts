/**
 * Tunnel URL policy, the same rules as coordinator/urls.py: an https origin (no credentials,
 * port, path, query or fragment) whose host is a DNS name under an allowed suffix. Loopback
 * (`http://127.0.0.1:<port>`, `localhost`, `[::1]`) only when DEV_ALLOW_LOOPBACK is true.
 */

export class InvalidTunnelURL extends Error {}

const LABEL = /^(?!-)[a-z0-9-]{1,63}(?<!-)$/;
const LOOPBACK = new Set(["127.0.0.1", "localhost", "[::1]"]);
const IPV4 = /^\d{1,3}(\.\d{1,3}){3}$/;

function suffixMatches(host: string, suffix: string): boolean {
  const s = suffix.trim().toLowerCase();
  if (s.length === 0) return false;
  if (s.startsWith(".")) return host.endsWith(s) && host.length > s.length;
  return host === s || host.endsWith(`.${s}`);
}

/** The normalised origin, or throws {@link InvalidTunnelURL} naming the rule broken. */
export function validateTunnelUrl(url: string, suffixes: string[], allowLoopback: boolean): string {
  if (typeof url !== "string" || url.length === 0 || url.length > 2048) {
    throw new InvalidTunnelURL("tunnel_url must be a non-empty string of at most 2048 characters");
  }
  for (let i = 0; i < url.length; i++) {
    const c = url.charCodeAt(i);
    if (c < 0x21 || c > 0x7e) {
      throw new InvalidTunnelURL("tunnel_url must be printable ASCII (IDN hosts are not accepted)");
    }
  }
  // The raw authority, before URL() normalises it (it would accept `https:host`, `\\`, etc.)
  const match = /^([A-Za-z][A-Za-z0-9+.-]*):\/\/([^/?#]*)([^?#]*)(\?[^#]*)?(#.*)?$/.exec(url);
  if (match === null) throw new InvalidTunnelURL("tunnel_url does not parse as scheme://host");
  const scheme = (match[1] ?? "").toLowerCase();
  const authority = match[2] ?? "";
  const path = match[3] ?? "";
  if (authority.includes("@")) throw new InvalidTunnelURL("tunnel_url must not carry credentials");
  if (authority.includes("\\") || authority.includes("%")) {
    throw new InvalidTunnelURL("tunnel_url host has characters a DNS name cannot have");
  }
  if ((path !== "" && path !== "/") || match[4] !== undefined || match[5] !== undefined) {
    throw new InvalidTunnelURL("tunnel_url must be an origin, without path, query or fragment");
  }
  let host: string;
  let port: string | null = null;
  if (authority.startsWith("[")) {
    const end = authority.indexOf("]");
    if (end < 0) throw new InvalidTunnelURL("tunnel_url does not parse: unclosed [");
    host = authority.slice(0, end + 1).toLowerCase();
    const rest = authority.slice(end + 1);
    if (rest !== "") {
      if (!/^:\d{1,5}$/.test(rest)) throw new InvalidTunnelURL("tunnel_url does not parse: bad port");
      port = rest.slice(1);
    }
  } else {
    const colon = authority.lastIndexOf(":");
    if (colon >= 0) {
      port = authority.slice(colon + 1);
      host = authority.slice(0, colon).toLowerCase();
      if (!/^\d{1,5}$/.test(port)) throw new InvalidTunnelURL("tunnel_url does not parse: bad port");
    } else {
      host = authority.toLowerCase();
    }
  }
  if (port !== null && Number(port) > 65535) throw new InvalidTunnelURL("tunnel_url port is out of range");
  if (host.length === 0) throw new InvalidTunnelURL("tunnel_url has no host");

  if (LOOPBACK.has(host)) {
    if (!allowLoopback) throw new InvalidTunnelURL("loopback tunnel URLs are accepted only in dev mode");
    if ((scheme !== "http" && scheme !== "https") || port === null || Number(port) === 0) {
      throw new InvalidTunnelURL("loopback tunnel URLs must be http(s)://127.0.0.1:<port>");
    }
    return `${scheme}://${host}:${Number(port)}`;
  }
  if (scheme !== "https") throw new InvalidTunnelURL("tunnel_url must use https");
  if (host.startsWith("[") || IPV4.test(host) || /^[0-9.]+$/.test(host) || /^0x/i.test(host)) {
    throw new InvalidTunnelURL("tunnel_url must name a host, not an IP address");
  }
  if (port !== null) throw new InvalidTunnelURL("tunnel_url must not name a port");
  if (host.length > 253) throw new InvalidTunnelURL("tunnel_url host is longer than a DNS name (253 characters)");
  const labels = host.split(".");
  if (labels.length < 2 || !labels.every((l) => LABEL.test(l))) {
    throw new InvalidTunnelURL("tunnel_url host is not a valid DNS name");
  }
  if (labels.some((l) => l.startsWith("xn--"))) {
    throw new InvalidTunnelURL("tunnel_url must be printable ASCII (IDN hosts are not accepted)");
  }
  if (/^\d+$/.test(labels[labels.length - 1] ?? "")) {
    throw new InvalidTunnelURL("tunnel_url must name a host, not an IP address");
  }
  if (!suffixes.some((s) => suffixMatches(host, s))) {
    throw new InvalidTunnelURL("tunnel_url host is not under an allowed suffix");
  }
  return `https://${host}`;
}
