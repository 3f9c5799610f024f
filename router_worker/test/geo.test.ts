import { describe, expect, it } from "vitest";
import { distanceKm, haversineKm, locationFromCf, rank, type CoordinatorView, type Location } from "../src/geo";
import { CF_LONDON, CF_NEW_YORK, CF_PARIS, CF_SYDNEY, CF_TOKYO } from "./helpers";

const NOW = 1_000_000;

function coord(id: string, cf: Record<string, unknown>, extra: Partial<CoordinatorView> = {}): CoordinatorView {
  return {
    id,
    url: `https://${id}.trycloudflare.com`,
    loc: locationFromCf(cf),
    state: "active",
    workers: 1,
    services: [{ name: "echo", ready_workers: 1, models: [], aliases: [] }],
    load: 0,
    in_flight: 0,
    last_seen: NOW,
    failures: 0,
    registered_at: 0,
    ...extra,
  };
}

const FLEET = [
  coord("lon", CF_LONDON),
  coord("par", CF_PARIS),
  coord("nyc", CF_NEW_YORK),
  coord("tyo", CF_TOKYO),
  coord("syd", CF_SYDNEY),
];

function order(caller: unknown, fleet = FLEET, opts: Partial<Parameters<typeof rank>[2]> = {}): string[] {
  return rank(fleet, locationFromCf(caller), { now: NOW, ttlMs: 30_000, ...opts }).map((c) => c.id);
}

describe("locationFromCf", () => {
  it.each([
    [undefined, { lat: null, lon: null, country: null, continent: null, colo: null }],
    [{}, { lat: null, lon: null, country: null, continent: null, colo: null }],
    [{ latitude: "51.5", longitude: "-0.12", country: "gb" }, { lat: 51.5, lon: -0.12, country: "GB" }],
    [{ latitude: 51.5, longitude: -0.12 }, { lat: 51.5, lon: -0.12 }],
    [{ latitude: "", longitude: "" }, { lat: null, lon: null }],
    [{ latitude: "abc", longitude: "1" }, { lat: null, lon: null }],
    [{ latitude: "91", longitude: "0" }, { lat: null, lon: null }],
    [{ latitude: "10", longitude: "181" }, { lat: null, lon: null }],
    [{ latitude: "10" }, { lat: null, lon: null }],
    [{ latitude: null, longitude: null, country: "T1" }, { lat: null, country: "T1" }],
    [{ country: "<script>" }, { country: null }],
    [{ continent: 7, colo: ["LHR"] }, { continent: null, colo: null }],
    ["not an object", { lat: null, country: null }],
  ])("%j", (cf, expected) => {
    expect(locationFromCf(cf)).toMatchObject(expected);
  });
});

describe("haversine", () => {
  it("measures London-Paris and antipodes", () => {
    expect(haversineKm(51.5074, -0.1278, 48.8566, 2.3522)).toBeCloseTo(343.5, 0);
    expect(haversineKm(0, 0, 0, 180)).toBeCloseTo(Math.PI * 6371.0088, 3);
    expect(haversineKm(10, 10, 10, 10)).toBe(0);
  });
  it("falls back to country, then continent", () => {
    const gb: Location = { lat: null, lon: null, country: "GB", continent: "EU", colo: null };
    expect(distanceKm(gb, { ...gb })).toBe(500);
    expect(distanceKm(gb, { ...gb, country: "FR" })).toBe(2500);
    expect(distanceKm(gb, { ...gb, country: "US", continent: "NA" })).toBe(12_000);
  });
});

describe("rank", () => {
  it("orders by distance from the caller", () => {
    expect(order(CF_LONDON)).toEqual(["lon", "par", "nyc", "tyo", "syd"]);
    expect(order(CF_TOKYO)[0]).toBe("tyo");
    expect(order(CF_SYDNEY)[0]).toBe("syd");
    expect(order({ latitude: "40.0", longitude: "-75.0", country: "US" })[0]).toBe("nyc");
    expect(order({ latitude: "50.1109", longitude: "8.6821", country: "DE", continent: "EU" }).slice(0, 2)).toEqual(["par", "lon"]);
  });
  it("uses country then continent when the caller has no coordinates", () => {
    expect(order({ country: "FR", continent: "EU" })[0]).toBe("par");
    expect(order({ country: "DE", continent: "EU" }).slice(0, 2).sort()).toEqual(["lon", "par"]);
    expect(order({ country: "JP", continent: "AS" })[0]).toBe("tyo");
    expect(order({ country: "NZ", continent: "OC" })[0]).toBe("syd");
  });
  it("uses country when a coordinator has no coordinates", () => {
    const fleet = [coord("a", { country: "BR", continent: "SA" }), coord("b", CF_NEW_YORK)];
    expect(order({ latitude: "-23.5", longitude: "-46.6", country: "BR", continent: "SA" }, fleet)[0]).toBe("a");
  });
  it("with no location at all, picks the lowest load, then the id", () => {
    const fleet = [coord("b", {}, { load: 0.5 }), coord("a", {}, { load: 0.5 }), coord("c", {}, { load: 0.1 })];
    expect(order(undefined, fleet)).toEqual(["c", "a", "b"]);
  });
  it("penalises load and recent failures", () => {
    const fleet = [coord("lon", CF_LONDON, { load: 1 }), coord("par", CF_PARIS)];
    expect(order(CF_LONDON, fleet)[0]).toBe("par");
    const failing = [coord("lon", CF_LONDON, { failures: 1 }), coord("par", CF_PARIS)];
    expect(order(CF_LONDON, failing)[0]).toBe("par");
    expect(order(CF_LONDON, [coord("lon", CF_LONDON), coord("par", CF_PARIS)], { localFailures: new Map([["lon", 2]]) })[0]).toBe("par");
  });
  it("never picks a stale, draining or service-less coordinator", () => {
    const fleet = [
      coord("stale", CF_LONDON, { last_seen: NOW - 30_001 }),
      coord("draining", CF_LONDON, { state: "draining" }),
      coord("empty", CF_LONDON, { services: [{ name: "echo", ready_workers: 0, models: [], aliases: [] }] }),
      coord("other", CF_LONDON, { services: [{ name: "ollama", ready_workers: 3, models: [], aliases: ["llm"] }] }),
      coord("far", CF_SYDNEY),
    ];
    expect(order(CF_LONDON, fleet, { service: "echo" })).toEqual(["far"]);
    expect(order(CF_LONDON, fleet, { service: "ollama" })).toEqual(["other"]);
    expect(order(CF_LONDON, fleet, { service: "llm" })).toEqual(["other"]); // an alias it reported
    expect(order(CF_LONDON, fleet)).toEqual(["empty", "other", "far"]);
    expect(order(CF_LONDON, [coord("edge", CF_LONDON, { last_seen: NOW - 30_000 })])).toEqual(["edge"]);
  });
  it("is deterministic", () => {
    const shuffled = [...FLEET].reverse();
    expect(order(CF_PARIS, shuffled)).toEqual(order(CF_PARIS));
  });
});
