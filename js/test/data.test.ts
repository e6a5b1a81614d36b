import { describe, expect, it } from "vitest";
import { attentionAt, checkPayload, float32Of, frameAt, heavyAt, overlayMap } from "../src/data";
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
