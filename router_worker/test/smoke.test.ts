import { expect, it } from "vitest";
import { router } from "./helpers";

it("answers /health", async () => {
  const r = router();
  const resp = await r.call("/health");
  expect(resp.status).toBe(200);
  expect(await resp.json()).toMatchObject({ status: "ok", coordinators: { registered: 0, healthy: 0 } });
});
