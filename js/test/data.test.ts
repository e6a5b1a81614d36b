import { describe, expect, it } from "vitest";
import {
  attentionAt,
  buffersMissing,
  checkPayload,
  ensureBinary,
  faithfulnessFor,
  float32Of,
  frameAt,
  gridCell,
  heavyAt,
  overlayMap,
  scaleRange,
} from "../src/data";
import { aucText } from "../src/faithfulness_view";
import { cellAt, gridCaption } from "../src/grid_view";
import type { FaithfulnessEntry, GridData } from "../src/schema";
import { fakeState, payload } from "./fake";

describe("array payloads", () => {
  it("slices the frame of a step without copying", () => {
    const state = fakeState();
    const frame = frameAt(state.previews, 1);
    expect(frame?.width).toBe(2);
    expect(Array.from(frame?.rgb ?? [])).toEqual(Array.from({ length: 12 }, (_, i) => 12 + i));
    expect(frameAt(state.previews, 3)).toBeNull();
    expect(frameAt(state.previews, -1)).toBeNull();
  });

  it("indexes attention as [step, token, h, w]", () => {
    const state = fakeState();
    const map = attentionAt(state.attention, 2, 1);
    // element (2, 1, 0, 0) is at flat index (2 * 2 + 1) * 4 = 20
    expect(Array.from(map?.values ?? [])).toEqual([200, 210, 220, 230]);
    expect(attentionAt(state.attention, 0, 5)).toBeNull();
  });

  it("finds heavy maps only for computed steps", () => {
    const state = fakeState();
    expect(Array.from(heavyAt(state.overlays, "df_rise", 2)?.values ?? [])).toEqual([
      0, 85, 170, 255,
    ]);
    expect(heavyAt(state.overlays, "df_rise", 1)).toBeNull();
    expect(heavyAt(state.overlays, "df_cam", 2)).toBeNull();
  });

  it("picks the overlay for the state", () => {
    const state = fakeState({ overlay: "attention", step: 1, token: 0 });
    expect(overlayMap(state)?.values[0]).toBe(80);
    expect(overlayMap({ ...state, overlay: "none" })).toBeNull();
    expect(overlayMap({ ...state, overlay: "df_rise", step: 2 })?.values[3]).toBe(255);
  });

  it("reads float32 from unaligned buffers and checks byte lengths", () => {
    const bytes = new Uint8Array(9);
    new DataView(bytes.buffer).setFloat32(1, 1.5, true);
    const unaligned = {
      dtype: "float32" as const,
      shape: [2],
      data: new DataView(bytes.buffer, 1, 8),
    };
    expect(float32Of(unaligned)[0]).toBe(1.5);
    expect(checkPayload(unaligned)).toBeNull();
    expect(checkPayload(payload("uint8", [3, 3], [1, 2]))).toMatch(/needs 9/);
  });
});

describe("colour scale, grid and faithfulness data", () => {
  it("the scale shows the attention map's own maximum and a method's raw range", () => {
    const state = fakeState({ overlay: "attention", step: 1, token: 0 });
    expect(scaleRange(state)).toEqual([0, expect.closeTo(0.3, 6)]);
    expect(scaleRange({ ...state, overlay: "df_rise", step: 2 })).toEqual([-0.2, 0.4]);
    expect(scaleRange({ ...state, overlay: "df_rise", step: 1 })).toBeNull();
    expect(scaleRange({ ...state, overlay: "none" })).toBeNull();
  });

  it("indexes grid cells as [layer, step, token, g, g]", () => {
    const values = Array.from({ length: 2 * 3 * 2 * 4 }, (_, i) => i);
    const grid: GridData = {
      source: "attention",
      layers: ["a", "b"],
      grids: [
        [2, 2],
        [1, 1],
      ],
      steps: [0, 1, 2],
      maps: payload("uint8", [2, 3, 2, 2, 2], values),
      per_token: true,
      description: "grid",
    };
    // cell (1, 2, 1) starts at ((1 * 3 + 2) * 2 + 1) * 4 = 44
    expect(Array.from(gridCell(grid, 1, 2, 1)?.values ?? [])).toEqual([44, 45, 46, 47]);
    expect(gridCell(grid, 2, 0, 0)).toBeNull();
    expect(gridCell({ ...grid, per_token: false }, 0, 0, 1)?.values[0]).toBe(0);
    expect(cellAt(27, 29, 2, 3)).toEqual([1, 0]);
    expect(cellAt(-1, 0, 2, 3)).toBeNull();
    expect(gridCaption(grid, "red", -1)).toMatch(/token “red”/);
  });

  it("turns base64 and other buffers into DataViews and sees missing ones", () => {
    const value = {
      a: { dtype: "uint8", shape: [3], data: { $b64: "AQID" } },
      b: [{ dtype: "uint8", shape: [2], data: new Uint8Array([4, 5]) }],
    };
    ensureBinary(value);
    const a = value.a.data as unknown as DataView;
    expect(a).toBeInstanceOf(DataView);
    expect(a.getUint8(2)).toBe(3);
    const b = value.b[0] as { data: unknown };
    expect((b.data as DataView).getUint8(1)).toBe(5);
    expect(buffersMissing(value)).toBe(false);
    expect(buffersMissing({ x: { dtype: "uint8", shape: [2], data: {} } })).toBe(true);
    expect(buffersMissing({ x: { dtype: "uint8", shape: [2] } })).toBe(true);
    expect(checkPayload({ dtype: "uint8", shape: [2], data: {} as DataView })).toMatch(
      /did not arrive/,
    );
  });

  it("finds the faithfulness entry of the shown map only", () => {
    const entry: FaithfulnessEntry = {
      overlay: "attention",
      step: 1,
      token: 1,
      layer: "",
      head: -1,
      operator: "renoise",
      operator_text: "noise",
      similarity: "ssim",
      fractions: payload("float32", [2], [0, 1]),
      curves: payload("float32", [4, 2], [1, 0.2, 0.3, 1, 1, 0.5, 0.4, 1]),
      deletion_auc: 0.6,
      insertion_auc: 0.65,
      random_deletion_auc: 0.75,
      random_insertion_auc: 0.7,
      random_deletion_sd: 0.01,
      random_insertion_sd: 0.02,
      n_random: 3,
      description: "d",
    };
    const state = fakeState({ faithfulness: [entry], overlay: "attention", step: 1, token: 1 });
    expect(faithfulnessFor(state)).toBe(entry);
    expect(faithfulnessFor({ ...state, token: 0 })).toBeNull();
    expect(faithfulnessFor({ ...state, step: 2 })).toBeNull();
    expect(faithfulnessFor({ ...state, attention_layer: "16x16" })).toBeNull();
    expect(aucText(entry)).toMatch(/deletion AUC 0.6 vs random 0.75 ± 0.01 \(lower is better\)/);
  });
});
