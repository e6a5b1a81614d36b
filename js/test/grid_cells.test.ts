import { describe, expect, it } from "vitest";
import { buildLut } from "../src/colormap";
import {
  cellCode,
  cellHoverText,
  cellRgb,
  cellScaleText,
  cellValue,
  MISSING_RGB,
  paintSquare,
  selectCell,
} from "../src/grid_cells";
import { gridSources } from "../src/grid_sources_view";
import { gridCaption, groupTitle } from "../src/grid_view";
import { LocalModel } from "../src/local_model";
import type { GridData } from "../src/schema";
import { fakeState, payload } from "./fake";

/** A causal grid: two layers in one block × three steps, one number per cell. */
function causalGrid(): GridData {
  return {
    source: "patching",
    groups: [
      {
        name: "mid_block",
        layers: ["mid_block.resnets.0", "mid_block.attentions.0"],
        labels: ["resnets.0", "attentions.0"],
        grid: [1, 1],
        maps: payload("uint8", [2, 3, 1, 1, 1], [0, 128, 255, 0, 0, 0]),
        values: payload("float32", [2, 3], [0, 0.5, 1, Number.NaN, 0.25, 2]),
      },
    ],
    steps: [0, 4, 8],
    tokens: [],
    per_token: false,
    description: "Causal grid",
    cells: { low: 0, high: 1, meaning: "share of seeds whose final image takes B's colour" },
  };
}

describe("scalar cells of the causal grid", () => {
  it("reads each cell's number by (layer row, step column), NaN as missing", () => {
    const group = causalGrid().groups[0];
    if (!group) throw new Error("no group");
    expect(cellValue(group, 0, 1)).toBeCloseTo(0.5);
    expect(cellValue(group, 1, 2)).toBe(2);
    expect(cellValue(group, 1, 0)).toBeNull(); // NaN: not computed
    expect(cellValue(group, 2, 0)).toBeNull(); // no such row
    expect(cellValue({ ...group, values: undefined }, 0, 0)).toBeNull();
  });

  it("colours a value by its place between low and high, clamped, grey when missing", () => {
    const cells = { low: -1, high: 1, meaning: "" };
    expect([cellCode(-1, cells), cellCode(0, cells), cellCode(1, cells)]).toEqual([0, 128, 255]);
    expect([cellCode(-5, cells), cellCode(5, cells)]).toEqual([0, 255]);
    const lut = buildLut();
    expect(cellRgb(1, cells, lut)).toEqual([252, 255, 164]); // inferno's bright end
    expect(cellRgb(-1, cells, lut)).toEqual([0, 0, 4]);
    expect(cellRgb(null, cells, lut)).toEqual(MISSING_RGB);
  });

  it("paints one cell as a single-colour square, clipped to the image", () => {
    const width = 5;
    const height = 4;
    const data = new Uint8ClampedArray(width * height * 4);
    paintSquare(data, width, height, 3, -1, 3, [10, 20, 30]);
    const painted: number[][] = [];
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        if (data[(y * width + x) * 4 + 3] === 255) painted.push([x, y]);
        else expect(data[(y * width + x) * 4]).toBe(0);
      }
    }
    // Rows -1..1 and columns 3..5 of the square: only (3..4) × (0..1) lie in the image.
    expect(painted).toEqual([
      [3, 0],
      [4, 0],
      [3, 1],
      [4, 1],
    ]);
    expect(Array.from(data.slice((1 * width + 4) * 4, (1 * width + 4) * 4 + 4))).toEqual([
      10, 20, 30, 255,
    ]);
  });

  it("says layer, step and value on hover, and the scale in the caption", () => {
    const grid = causalGrid();
    const group = grid.groups[0];
    if (!group) throw new Error("no group");
    expect(cellHoverText(grid, group, 0, 1)).toBe("layer mid_block.resnets.0 · step 4 · value 0.5");
    expect(cellHoverText(grid, group, 1, 0)).toBe(
      "layer mid_block.attentions.0 · step 0 · value not computed",
    );
    const caption = gridCaption(grid, "red", -1);
    expect(caption).toContain(cellScaleText(grid.cells ?? { low: 0, high: 0, meaning: "" }));
    expect(caption).toContain("dark 0 to bright 1: share of seeds");
    expect(caption).toContain("Click a cell to show its step");
    expect(groupTitle(group, false)).toBe("▾ mid_block · 2 layers"); // no 1×1 grid
  });

  it("a click on a causal cell moves only the step; the menu offers what the kernel computes", () => {
    const model = new LocalModel(fakeState({ grid: "patching", overlay: "none" }));
    selectCell(model.asModel(), "patching", "mid_block.resnets.0", 2);
    expect([model.get("step"), model.get("overlay")]).toEqual([2, "none"]);
    const state = fakeState();
    expect(gridSources(state)).toEqual(["none", "attention"]);
    const withPipe = fakeState({ available: [...state.available, "concept"] });
    expect(gridSources(withPipe)).toEqual(["none", "attention", "concept", "patching"]);
    // A file without a kernel keeps the grid it was saved with, and offers no computing.
    const exported = fakeState({ available: withPipe.available, actions: [], grid: "patching" });
    expect(gridSources(exported)).toEqual(["none", "attention", "patching"]);
  });
});
