import { describe, expect, it } from "vitest";
import {
  ATTENTION_CACHE_SIZE,
  attentionAt,
  attentionCache,
  buffersMissing,
  checkPayload,
  ensureBinary,
  faithfulnessFor,
  float32Of,
  frameAt,
  gridCell,
  heavyAt,
  overlayMap,
  pickAttention,
  rememberAttention,
  scaleRange,
} from "../src/data";
import { aucText } from "../src/faithfulness_view";
import { CELL_PX, GROUP_PX, gridCaption, gridLayout, hitTest, PITCH_PX } from "../src/grid_view";
import type { AttentionSet, FaithfulnessEntry, GridData } from "../src/schema";
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

  it("indexes attention as [step, token, h, w] through the set's steps", () => {
    const state = fakeState();
    const map = attentionAt(state.attention, 2, 1);
    // element (2, 1, 0, 0) is at flat index (2 * 2 + 1) * 4 = 20
    expect(Array.from(map?.values ?? [])).toEqual([200, 210, 220, 230]);
    expect(attentionAt(state.attention, 0, 5)).toBeNull();
    const later = { ...(state.attention as AttentionSet), steps: [10, 11, 12] };
    expect(attentionAt(later, 12, 1)?.values[0]).toBe(200);
    expect(attentionAt(later, 2, 1)).toBeNull();
  });

  it("shows the filter's own set: default, just sent, or kept from before", () => {
    const state = fakeState();
    const other = { ...(state.attention as AttentionSet), layer: "16x16" };
    const owner = {};
    const cache = attentionCache(owner);
    const picked = (layer: string, head = -1, sent: AttentionSet | null = null) =>
      pickAttention(
        { ...state, attention_layer: layer, attention_head: head, attention_filtered: sent },
        cache,
      );
    expect(picked("")).toBe(state.attention);
    expect(picked("16x16")).toBeNull(); // not received yet: nothing drawn
    expect(picked("16x16", -1, other)).toBe(other);
    rememberAttention(cache, other);
    expect(picked("16x16")).toBe(other); // back to it later: no kernel needed
    expect(picked("16x16", 2)).toBeNull(); // another head is another filter
    expect(attentionCache(owner)).toBe(cache);
    for (let k = 0; k < ATTENTION_CACHE_SIZE + 3; k++) {
      rememberAttention(cache, { ...other, layer: `l${k}` });
    }
    expect(cache.size).toBe(ATTENTION_CACHE_SIZE);
    expect(picked("16x16")).toBeNull(); // the oldest went first
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

  it("indexes grid cells per group as [layer, step, token, h, w] and lays rows out", () => {
    const values = Array.from({ length: 2 * 3 * 2 * 4 }, (_, i) => i);
    const grid: GridData = {
      source: "attention",
      groups: [
        {
          name: "down_blocks.1",
          layers: ["down_blocks.1.attentions.0.transformer_blocks.0.attn2", "x.b"],
          labels: ["attentions.0.transformer_blocks.0.attn2", "b"],
          grid: [4, 4],
          maps: payload("uint8", [2, 3, 2, 2, 2], values),
        },
        {
          name: "mid_block",
          layers: ["mid_block.attentions.0.transformer_blocks.0.attn2"],
          labels: ["attentions.0.transformer_blocks.0.attn2"],
          grid: [1, 1],
          maps: payload("uint8", [1, 3, 2, 1, 1], [0, 1, 2, 3, 4, 5]),
        },
      ],
      steps: [0, 1, 2],
      tokens: [3, 5],
      per_token: true,
      description: "grid",
    };
    // row 1, column 2, token 5 (the second held): ((1 * 3 + 2) * 2 + 1) * 4 = 44
    expect(Array.from(gridCell(grid, 1, 2, 5)?.values ?? [])).toEqual([44, 45, 46, 47]);
    expect(gridCell(grid, 2, 1, 3)?.values[0]).toBe(2);
    expect(gridCell(grid, 3, 0, 3)).toBeNull();
    expect(gridCell(grid, 0, 0, 4)).toBeNull(); // a token the kernel has not sent
    const layout = gridLayout(grid, new Set());
    expect(layout.rows).toBe(3);
    expect(layout.lines.map((l) => l.kind)).toEqual(["group", "row", "row", "group", "row"]);
    // second group's header sits under the first group's header and two rows
    expect(layout.lines[3]?.y).toBe(GROUP_PX + 2 * PITCH_PX);
    const hit = hitTest(layout, PITCH_PX + 1, GROUP_PX + PITCH_PX + 1);
    expect(hit?.kind === "cell" && [hit.line.row, hit.column]).toEqual([1, 1]);
    expect(hitTest(layout, CELL_PX + 1, GROUP_PX + 1)).toBeNull(); // the gap
    expect(hitTest(layout, 5, 2)).toEqual({ kind: "group", group: 0 });
    // a folded group keeps its header and hides its rows
    const folded = gridLayout(grid, new Set([0]));
    expect(folded.lines.map((l) => l.kind)).toEqual(["group", "group", "row"]);
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
    // exported files: references into the inflated data block, bounds checked
    const data = new Uint8Array([9, 8, 7, 6, 5]);
    const ref = ensureBinary({ x: { data: { $buf: [1, 3] } } }, data) as {
      x: { data: DataView };
    };
    expect(Array.from(new Uint8Array(ref.x.data.buffer, ref.x.data.byteOffset, 3))).toEqual([
      8, 7, 6,
    ]);
    expect(() => ensureBinary({ data: { $buf: [3, 3] } }, data)).toThrow(/outside the file/);
    expect(() => ensureBinary({ data: { $buf: [0, 1] } })).toThrow(/outside the file/);
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
