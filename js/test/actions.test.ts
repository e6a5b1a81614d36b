import { afterEach, describe, expect, it, vi } from "vitest";
import {
  captionText,
  clampStep,
  requestCancel,
  SYNC_INTERVAL_MS,
  selectToken,
  setStep,
  stepBy,
  tokenVisible,
} from "../src/actions";
import { buildLut, colourise } from "../src/colormap";
import { polylinePoints, stepFromX, xOf } from "../src/curves_view";
import { decodeState } from "../src/local_model";
import { FRONTEND_WRITABLE } from "../src/schema";
import { fakeModel, fakeState } from "./fake";

describe("actions on a fake model", () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it("clamps steps and redraws on every change", () => {
    vi.useFakeTimers();
    const model = fakeModel();
    let changes = 0;
    model.on("change:step", () => {
      changes += 1;
    });
    setStep(model.asModel(), 7);
    expect(model.get("step")).toBe(2);
    stepBy(model.asModel(), -5);
    expect(model.get("step")).toBe(0);
    setStep(model.asModel(), 0); // no change: no event
    expect(changes).toBe(2);
    expect(clampStep(Number.NaN, 5)).toBe(0);
    expect(clampStep(1.6, 5)).toBe(2);
  });

  it("scrubbing syncs at once, then at most once per interval", () => {
    vi.useFakeTimers();
    const model = fakeModel({ timesteps: Array.from({ length: 20 }, (_, i) => 999 - i) });
    for (let step = 1; step < 20; step++) setStep(model.asModel(), step); // one burst
    expect(model.get("step")).toBe(19); // the view is already there
    expect(model.saves).toBe(1); // leading sync only
    vi.advanceTimersByTime(SYNC_INTERVAL_MS);
    expect(model.saves).toBe(2); // one trailing sync carries the last step
    vi.advanceTimersByTime(10 * SYNC_INTERVAL_MS);
    expect(model.saves).toBe(2); // nothing left to send
  });

  it("token click shows its attention when no overlay is on", () => {
    const model = fakeModel({ token: 1 });
    selectToken(model.asModel(), 0);
    expect(model.get("token")).toBe(0);
    expect(model.get("overlay")).toBe("attention");
    model.set("overlay", "df_rise");
    selectToken(model.asModel(), 1);
    expect(model.get("overlay")).toBe("df_rise"); // an explicit choice is kept
  });

  it("cancel is a message, not state", () => {
    const model = fakeModel();
    requestCancel(model.asModel());
    expect(model.sent).toEqual([{ kind: "cancel" }]);
  });

  it("hides special tokens unless asked", () => {
    expect(tokenVisible("word", false)).toBe(true);
    expect(tokenVisible("pad", false)).toBe(false);
    expect(tokenVisible("start", true)).toBe(true);
  });

  it("captions say what is drawn", () => {
    const state = fakeState({ step: 1, overlay: "attention", token: 1 });
    expect(captionText(state)).toBe(
      "Step 1 of 2 (scheduler t = 500). Predicted x0. " +
        "Overlay for token “red”: Cross-attention, cond half.",
    );
    expect(captionText({ ...state, overlay: "df_rise" })).toMatch(/not computed for step 1/);
    expect(captionText({ ...state, overlay: "df_rise", step: 2 })).toMatch(/n_masks 8/);
  });

  it("the front end writes only what the schema allows", () => {
    expect([...FRONTEND_WRITABLE].sort()).toEqual(
      ["image_mode", "opacity", "overlay", "show_special", "step", "token"].sort(),
    );
  });
});

describe("drawing helpers", () => {
  it("colour map runs dark to bright and alpha follows value", () => {
    const lut = buildLut();
    expect(Array.from(lut.slice(0, 3))).toEqual([0, 0, 4]);
    expect(Array.from(lut.slice(255 * 3))).toEqual([252, 255, 164]);
    const out = new Uint8ClampedArray(8);
    colourise(Uint8Array.from([0, 255]), lut, 0.8, out);
    expect(out[3]).toBeLessThan(out[7] as number);
    expect(out[7]).toBe(204);
  });

  it("curve x and click position are inverse", () => {
    for (let step = 0; step < 20; step++) expect(stepFromX(xOf(step, 20), 20)).toBe(step);
    expect(stepFromX(-50, 20)).toBe(0);
    expect(stepFromX(10_000, 20)).toBe(19);
  });

  it("polylines skip steps that were not computed", () => {
    const points = polylinePoints(Float32Array.from([0, Number.NaN, 1]), 0, 1).split(" ");
    expect(points).toHaveLength(2);
  });
});

describe("standalone state", () => {
  it("decodes base64 buffers into DataViews", () => {
    const state = decodeState({ previews: { dtype: "uint8", shape: [3], data: { $b64: "AQID" } } });
    const data = state.previews?.data;
    expect(data).toBeInstanceOf(DataView);
    expect([data?.getUint8(0), data?.getUint8(2)]).toEqual([1, 3]);
  });

  it("listeners can be removed (views clean up)", () => {
    const model = fakeModel();
    const handler = () => {};
    model.on("change:step", handler);
    expect(model.listenerCount()).toBe(1);
    model.off("change:step", handler);
    expect(model.listenerCount()).toBe(0);
  });
});
