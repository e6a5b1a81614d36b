import { afterEach, describe, expect, it, vi } from "vitest";
import {
  captionText,
  clampStep,
  overlayName,
  overlayUsesToken,
  requestCancel,
  requestConcept,
  SYNC_INTERVAL_MS,
  selectGridCell,
  selectToken,
  setStep,
  shownStep,
  stepBy,
  tokenVisible,
} from "../src/actions";
import { buildLut, colourise } from "../src/colormap";
import {
  groupMembers,
  polylinePoints,
  spreadLabels,
  stepFromX,
  stepTicks,
  ticks,
  xOf,
} from "../src/curves_view";
import { overlayMap, scaleRange } from "../src/data";
import { decodeState } from "../src/local_model";
import { FRONTEND_WRITABLE, OVERLAY_LABELS } from "../src/schema";
import { fakeModel, fakeState, payload } from "./fake";

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
    // A malformed step never reaches the text as NaN.
    const bad = captionText({ ...state, step: "x" as unknown as number });
    expect(bad).toMatch(/^Step 0 of 2 \(scheduler t = 999\)/);
    expect(bad).not.toMatch(/NaN/);
  });

  it("a typed concept word asks for its map and is captioned as text", () => {
    const model = fakeModel({ available: ["none", "attention", "concept"] });
    requestConcept(model.asModel(), "  <b>dog</b> ");
    expect(model.get("concept")).toBe("<b>dog</b>");
    expect(model.get("overlay")).toBe("concept");
    expect(model.saves).toBe(1);
    const set = {
      steps: [1],
      maps: payload("uint8", [1, 2, 2], [0, 64, 128, 255]),
      ranges: [[0, 1]] as [number, number][],
      layer: "",
      descriptions: ["concept map of “<b>dog</b>” at step 1"],
    };
    const state = fakeState({ step: 1, overlay: "concept", concept: "<b>dog</b>" });
    expect(captionText(state)).toMatch(/concept map of “<b>dog<\/b>” is not computed for step 1/);
    expect(captionText({ ...state, concept: "" })).toMatch(/Type a word/);
    const shown = { ...state, overlays: { concept: set } };
    expect(captionText(shown)).toMatch(/Overlay: concept map of “<b>dog<\/b>” at step 1\./);
    expect(overlayMap(shown)?.values[2]).toBe(128);
    expect(scaleRange(shown)).toEqual([0, 1]);
  });

  it("a malformed step is drawn at a valid step", () => {
    const model = fakeModel();
    for (const bad of ["7", Number.NaN, null, 1e9, -3, 1.6]) {
      model.set("step", bad as unknown as number);
      const step = shownStep(model.asModel());
      expect(Number.isInteger(step)).toBe(true);
      expect(step).toBeGreaterThanOrEqual(0);
      expect(step).toBeLessThanOrEqual(2);
      expect(Number.isFinite(xOf(step, 3))).toBe(true);
    }
    model.set("step", 1.6);
    expect(shownStep(model.asModel())).toBe(2);
  });

  it("labels come from the schema", () => {
    expect(overlayName("df_cam")).toBe(OVERLAY_LABELS.df_cam);
    expect(overlayName("attention")).toBe("token cross-attention");
    expect(overlayUsesToken("attention")).toBe(true);
    expect(overlayUsesToken("df_rise")).toBe(false);
  });

  it("a grid cell click moves step, overlay and (known) layer", () => {
    const model = fakeModel({
      layer_options: {
        attention: [
          { value: "", label: "all" },
          { value: "down.attn2", label: "down" },
        ],
        saliency: {},
        heads: 0,
      },
    });
    selectGridCell(model.asModel(), "attention", "down.attn2", 2);
    expect([model.get("step"), model.get("overlay"), model.get("attention_layer")]).toEqual([
      2,
      "attention",
      "down.attn2",
    ]);
    // A layer the kernel does not offer (a kernel-less export) leaves the filter alone.
    selectGridCell(model.asModel(), "attention", "elsewhere", 1);
    expect([model.get("step"), model.get("attention_layer")]).toEqual([1, "down.attn2"]);
  });

  it("the front end writes only what the schema allows", () => {
    expect([...FRONTEND_WRITABLE].sort()).toEqual(
      [
        "image_mode",
        "opacity",
        "overlay",
        "show_special",
        "step",
        "token",
        "attention_layer",
        "attention_head",
        "saliency_layer",
        "concept",
        "grid",
        "switch_word",
        "switch_replacement",
        "switch_seeds",
        "patch_word",
        "patch_replacement",
      ].sort(),
    );
  });
});

describe("drawing helpers", () => {
  it("colour map runs dark to bright and alpha follows value", () => {
    const lut = buildLut();
    expect(Array.from(lut.slice(0, 3))).toEqual([0, 0, 4]);
    expect(Array.from(lut.slice(255 * 3))).toEqual([252, 255, 164]);
    const out = new Uint8ClampedArray(12);
    colourise(Uint8Array.from([0, 128, 255]), lut, 0.8, out);
    expect(out[3]).toBe(0); // the low end is fully transparent
    expect(out[7]).toBe(Math.round(0.8 * 128));
    expect(out[11]).toBe(204);
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

  it("axes get ticks at both ends and direct labels never overlap", () => {
    expect(ticks(0, 1, 3)).toEqual([0, 0.5, 1]);
    expect(stepTicks(20)).toEqual([0, 5, 10, 14, 19]);
    expect(stepTicks(1)).toEqual([0]);
    const placed = spreadLabels([50, 50, 52, 90], 10);
    const sorted = [...placed].sort((a, b) => a - b);
    for (let i = 1; i < sorted.length; i++) {
      expect((sorted[i] as number) - (sorted[i - 1] as number)).toBeGreaterThanOrEqual(10);
    }
    expect(placed[3]).toBe(90); // a label with room stays at its curve's end
  });

  it("repeated words get their position in curve labels", () => {
    const series = [
      { name: "a", group: "attention_mass" as const, token: 1 },
      { name: "red", group: "attention_mass" as const, token: 2 },
      { name: "a", group: "attention_mass" as const, token: 5 },
      { name: "auc", group: "concept_auc" as const, token: null },
    ];
    const members = groupMembers(
      series,
      "attention_mass",
      ["start", "word", "word", "w", "w", "word"],
      false,
    );
    expect(members.map((m) => m.label)).toEqual(["a (1)", "red", "a (5)"]);
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
