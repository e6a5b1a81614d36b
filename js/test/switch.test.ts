import { describe, expect, it } from "vitest";
import { CROSSING_GROUPS, crossingStep } from "../src/curves_view";
import { COMMITTED_LEVEL, type SwitchFilmstrip } from "../src/schema";
import {
  filmstripFrames,
  filmstripSummary,
  NO_KERNEL,
  NO_PIPELINE,
  requestSwitch,
  switchBlocked,
  switchLabel,
} from "../src/switch_view";
import { fakeModel, payload } from "./fake";

/** Three switch steps (0, 2 and n = 4, prompt A's own image) of 1 x 2 images. */
function film(overrides: Partial<SwitchFilmstrip> = {}): SwitchFilmstrip {
  // Image i is pixel (10i, 10i + 1, 10i + 2) then (200, 100, 50).
  const rgb = [0, 1, 2].flatMap((i) => [10 * i, 10 * i + 1, 10 * i + 2, 200, 100, 50]);
  return {
    word: "red",
    replacement: "blue",
    prompt_b: "a blue circle",
    seed: 7,
    n_seeds: 4,
    n_steps: 4,
    steps: [0, 2, 4],
    images: payload("uint8", [3, 1, 2, 3], rgb),
    attributes: ["colour", "shape"],
    a_values: ["red", "circle"],
    committed: [2, null],
    ...overrides,
  };
}

describe("crossing of the committed level", () => {
  it("is the first step from which every computed value stays at or above the level", () => {
    // By hand: 0.95 at step 1 dips to 0.5 at step 2; from step 3 on every value is >= 0.9
    // (step 4 is not computed and is skipped).
    const curve = [0.1, 0.95, 0.5, 0.92, Number.NaN, 1.0];
    expect(crossingStep(curve, 0.9)).toBe(3);
    expect(crossingStep([0.9, 0.9], 0.9)).toBe(0); // reaching the level counts
    expect(crossingStep([Number.NaN, 0.2, 0.95], 0.9)).toBe(2);
  });

  it("is null when the curve ends below the level or has no value", () => {
    expect(crossingStep([0.95, 0.97, 0.89], 0.9)).toBeNull();
    expect(crossingStep([0.95, 0.97, 0.89, Number.NaN], 0.9)).toBeNull();
    expect(crossingStep([Number.NaN, Number.NaN], 0.9)).toBeNull();
    expect(crossingStep([], 0.9)).toBeNull();
  });

  it("is drawn in the probe and the commitment groups at the schema's level", () => {
    expect([...CROSSING_GROUPS]).toEqual(["concept_auc", "commitment"]);
    expect(COMMITTED_LEVEL).toBe(0.9);
  });
});

describe("filmstrip", () => {
  it("turns each switch step's image into RGBA pixels, labelled, the current step marked", () => {
    const frames = filmstripFrames(film(), 2);
    expect(frames.map((f) => f.label)).toEqual(["switch at 0", "switch at 2", "no switch (A)"]);
    expect(frames.map((f) => f.current)).toEqual([false, true, false]);
    expect(frames.map((f) => [f.width, f.height])).toEqual([
      [2, 1],
      [2, 1],
      [2, 1],
    ]);
    expect([...(frames[1]?.rgba ?? [])]).toEqual([10, 11, 12, 255, 200, 100, 50, 255]);
    expect([...(frames[2]?.rgba ?? [])]).toEqual([20, 21, 22, 255, 200, 100, 50, 255]);
  });

  it("draws nothing from a missing or misshapen payload", () => {
    expect(filmstripFrames(null, 0)).toEqual([]);
    expect(filmstripFrames(film({ steps: [0, 2] }), 0)).toEqual([]);
    const short = film({ images: payload("uint8", [3, 1, 2, 3], [1, 2, 3]) });
    expect(filmstripFrames(short, 0)).toEqual([]);
  });

  it("labels the switch steps and says when each attribute committed", () => {
    expect(switchLabel(3, 4)).toBe("switch at 3");
    expect(switchLabel(4, 4)).toBe("no switch (A)");
    const text = filmstripSummary(film());
    expect(text).toContain("“a blue circle”");
    expect(text).toContain("seed 7");
    expect(text).toContain("colour (red) committed from switch step 2");
    expect(text).toContain("shape (circle) never committed");
    expect(text).toContain("≥ 90 % of 4 seeds");
  });
});

describe("the switch button", () => {
  it("says in one line why it cannot run", () => {
    const words = ["red"];
    expect(switchBlocked({ actions: [], switch_words: words })).toBe(NO_KERNEL);
    expect(switchBlocked({ actions: ["cancel"], switch_words: words })).toBe(NO_PIPELINE);
    expect(switchBlocked({ actions: ["cancel", "prompt_switch"], switch_words: words })).toBeNull();
    expect(switchBlocked({ actions: ["cancel", "prompt_switch"], switch_words: [] })).toContain(
      "no content word",
    );
  });

  it("sets the picker's traits and sends the values it asks for", () => {
    const model = fakeModel();
    requestSwitch(model.asModel(), "red", "  <b>blue</b> ", 3);
    expect(model.get("switch_word")).toBe("red");
    expect(model.get("switch_replacement")).toBe("<b>blue</b>");
    expect(model.get("switch_seeds")).toBe(3);
    expect(model.saves).toBe(1);
    expect(model.sent).toEqual([
      { kind: "prompt_switch", word: "red", replacement: "<b>blue</b>", seeds: 3 },
    ]);
  });
});
