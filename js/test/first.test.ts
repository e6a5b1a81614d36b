import { describe, expect, it } from "vitest";
import manifestJson from "../../diffwidget/models/live/unet/manifest.json";
import { type FirstRunPayload, halfToFloat, runFromFirst } from "../src/live/first";
import { checkManifest } from "../src/live/manifest";

const manifest = checkManifest(manifestJson);
const tail = { string: "", kind: "pad" as const };

describe("precomputed first run", () => {
  it("reads IEEE half-precision bits", () => {
    // Bit patterns and values from the IEEE 754 binary16 definition.
    expect(halfToFloat(0x3c00)).toBe(1);
    expect(halfToFloat(0xc000)).toBe(-2);
    expect(halfToFloat(0x7bff)).toBe(65504);
    expect(halfToFloat(0x0001)).toBe(2 ** -24);
    expect(halfToFloat(0x3555)).toBe(0.333251953125);
    expect(halfToFloat(0x7c00)).toBe(Number.POSITIVE_INFINITY);
  });

  it("refuses a run of another model or other text positions", async () => {
    const first = {
      model: "dit",
      prompt: "a red circle",
      seed: 0,
      steps: 20,
      guidance: 3,
      selected: [0, 1, 2, 3, 4],
    } as unknown as FirstRunPayload;
    await expect(runFromFirst(first, manifest, tail)).rejects.toThrow("another model");
    const shifted = { ...first, model: "unet", selected: [0, 1] };
    await expect(runFromFirst(shifted, manifest, tail)).rejects.toThrow("text positions");
  });
});
