/** Selection time over 1,000 coordinators (`make router-bench`), inside workerd. */
import { bench, describe } from "vitest";
import { locationFromCf, rank, type CoordinatorView } from "../src/geo";

const NOW = Date.now();
const fleet: CoordinatorView[] = Array.from({ length: 1000 }, (_, i) => ({
  id: `coord-${String(i).padStart(4, "0")}`,
  url: `https://c${i}.trycloudflare.com`,
  loc: locationFromCf({
    latitude: String(((i * 37) % 170) - 85),
    longitude: String(((i * 73) % 350) - 175),
    country: ["GB", "FR", "US", "JP", "BR", "AU", "DE", "IN"][i % 8],
    continent: ["EU", "EU", "NA", "AS", "SA", "OC", "EU", "AS"][i % 8],
  }),
  state: "active",
  workers: 10,
  services: [
    { name: "echo", ready_workers: 5, models: [], aliases: [] },
    { name: i % 3 === 0 ? "ollama" : "vllm", ready_workers: i % 5, models: ["llama3"], aliases: [] },
  ],
  load: (i % 10) / 10,
  in_flight: i % 50,
  last_seen: NOW - (i % 40) * 1000,
  failures: i % 17 === 0 ? 1 : 0,
  registered_at: NOW - 3_600_000,
}));
const caller = locationFromCf({ latitude: "51.5074", longitude: "-0.1278", country: "GB", continent: "EU" });
const noCoords = locationFromCf({ country: "GB", continent: "EU" });

describe("rank() over 1,000 coordinators", () => {
  bench("with coordinates, any service (worker registration)", () => {
    rank(fleet, caller, { now: NOW, ttlMs: 45_000 });
  });
  bench("with coordinates, service filter (public request)", () => {
    rank(fleet, caller, { now: NOW, ttlMs: 45_000, service: "ollama" });
  });
  bench("country/continent only", () => {
    rank(fleet, noCoords, { now: NOW, ttlMs: 45_000, service: "echo" });
  });
});
