import { describe, expect, it } from "vitest";
import { axisWeights, resizeBilinear } from "../src/data";

/**
 * Bilinear resize written from the definition, independently of `resizeBilinear`: each
 * output pixel (i, j) samples the source at ((i + 0.5) * h / H - 0.5, (j + 0.5) * w / W - 0.5),
 * clamped to the grid, from its four neighbours (torch's align_corners=False, which the
 * kernel's `upsample_maps` follows). Float64 throughout.
 */
function referenceBilinear(values: number[], h: number, w: number, H: number, W: number): number[] {
  const at = (y: number, x: number) => values[y * w + x] as number;
  const out: number[] = [];
  for (let i = 0; i < H; i++) {
    const sy = Math.min(Math.max(((i + 0.5) * h) / H - 0.5, 0), h - 1);
    const y0 = Math.floor(sy);
    const y1 = Math.min(y0 + 1, h - 1);
    const fy = sy - y0;
    for (let j = 0; j < W; j++) {
      const sx = Math.min(Math.max(((j + 0.5) * w) / W - 0.5, 0), w - 1);
      const x0 = Math.floor(sx);
      const x1 = Math.min(x0 + 1, w - 1);
      const fx = sx - x0;
      out.push(
        at(y0, x0) * (1 - fy) * (1 - fx) +
          at(y0, x1) * (1 - fy) * fx +
          at(y1, x0) * fy * (1 - fx) +
          at(y1, x1) * fy * fx,
      );
    }
  }
  return out;
}

function randomMap(h: number, w: number, seed: number): Uint8Array {
  let state = seed;
  const values = new Uint8Array(h * w);
  for (let i = 0; i < values.length; i++) {
    state = (state * 1103515245 + 12345) % 2147483648;
    values[i] = state % 256;
  }
  return values;
}

describe("bilinear upsampling in the view", () => {
  const cases: [number, number, number, number][] = [
    [8, 8, 384, 384],
    [8, 16, 384, 384], // a non-square layer grid on a square view
    [64, 64, 384, 384],
    [5, 3, 26, 26], // odd grids into a grid cell
    [16, 16, 16, 16], // same size: the map itself
    [32, 32, 16, 16], // shrinking works too
  ];
  for (const [h, w, H, W] of cases) {
    it(`matches the from-scratch reference ${h}×${w} -> ${H}×${W}`, () => {
      const values = randomMap(h, w, h * 31 + w);
      const out = resizeBilinear({ width: w, height: h, values }, H, W);
      const expected = referenceBilinear(Array.from(values), h, w, H, W);
      let worst = 0;
      for (let k = 0; k < out.length; k++) {
        worst = Math.max(worst, Math.abs((out[k] as number) - (expected[k] as number)));
      }
      // Rounded to the nearest code: at most half a code away (plus float32 rounding).
      expect(worst).toBeLessThanOrEqual(0.5 + 1e-3);
      if (h === H && w === W) expect(Array.from(out)).toEqual(Array.from(values));
    });
  }

  it("keeps constant maps constant and an edge's values at the edge", () => {
    const flat = resizeBilinear({ width: 3, height: 2, values: new Uint8Array(6).fill(77) }, 9, 7);
    expect(new Set(flat)).toEqual(new Set([77]));
    const ramp = resizeBilinear({ width: 2, height: 1, values: new Uint8Array([0, 200]) }, 1, 8);
    expect(ramp[0]).toBe(0);
    expect(ramp[7]).toBe(200);
    expect(Array.from(ramp)).toEqual([...ramp].sort((a, b) => a - b)); // monotone
  });

  it("caches one weight table per (input, output) size", () => {
    expect(axisWeights(8, 384)).toBe(axisWeights(8, 384));
    const table = axisWeights(2, 4);
    expect(Array.from(table.low)).toEqual([0, 0, 0, 1]);
    expect(Array.from(table.frac)).toEqual([0, 0.25, 0.75, 0]);
  });
});
