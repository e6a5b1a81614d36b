import { LocalModel } from "../src/local_model";
import type { ArrayPayload, WidgetState } from "../src/schema";

/** An ArrayPayload over a typed array (as the widget manager would deliver it). */
export function payload(
  dtype: ArrayPayload["dtype"],
  shape: number[],
  values: ArrayLike<number>,
): ArrayPayload {
  const array = dtype === "uint8" ? Uint8Array.from(values) : Float32Array.from(values);
  return { dtype, shape, data: new DataView(array.buffer) };
}

/** A 3-step, 2-token, 2x2 state with previews, attention and one DF-RISE map. */
export function fakeState(overrides: Partial<WidgetState> = {}): WidgetState {
  const previews = Array.from({ length: 3 * 2 * 2 * 3 }, (_, i) => i);
  const attention = Array.from({ length: 3 * 2 * 4 }, (_, i) => (i * 10) % 256);
  return {
    step: 0,
    token: 1,
    overlay: "none",
    opacity: 0.5,
    image_mode: "x0",
    show_special: false,
    attention_layer: "",
    attention_head: -1,
    saliency_layer: "",
    concept: "",
    patch_word: "",
    patch_replacement: "",
    grid: "none",
    switch_word: "",
    switch_replacement: "",
    switch_seeds: 1,
    switch_words: ["red", "circle"],
    switch: null,
    status: "idle",
    progress: 0,
    error: "",
    prompt: "a red circle",
    tokens: ["<start>", "red", "<end>"],
    token_kinds: ["start", "word", "end"],
    timesteps: [999, 500, 1],
    available: ["none", "attention", "df_rise"],
    actions: ["cancel", "buffers_missing"],
    transport: "binary",
    exact_steps: [],
    layer_options: { attention: [], saliency: {}, heads: 0 },
    grid_data: null,
    scales: {},
    faithfulness: [],
    previews: payload("uint8", [3, 2, 2, 3], previews),
    noisy_previews: payload(
      "uint8",
      [3, 2, 2, 3],
      previews.map((v) => 255 - v),
    ),
    attention: {
      layer: "",
      head: -1,
      grid: [2, 2],
      steps: [0, 1, 2],
      maps: {
        ...payload("uint8", [3, 2, 2, 2], attention),
        scale: payload("float32", [3, 2], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]),
      },
      description: "Cross-attention, cond half",
    },
    attention_filtered: null,
    overlays: {
      df_rise: {
        steps: [2],
        maps: payload("uint8", [1, 2, 2], [0, 85, 170, 255]),
        ranges: [[-0.2, 0.4]],
        layer: "",
        descriptions: ["DF-RISE saliency (n_masks 8)"],
      },
    },
    curves: {
      series: [
        { name: "<start>", group: "attention_mass", token: 0 },
        { name: "red", group: "attention_mass", token: 1 },
      ],
      values: payload("float32", [2, 3], [0.5, 0.6, 0.7, 0.1, Number.NaN, 0.3]),
    },
    descriptions: {
      x0: "Predicted x0",
      noisy: "Noisy x_t",
    },
    ...overrides,
  };
}

export function fakeModel(overrides: Partial<WidgetState> = {}): LocalModel {
  return new LocalModel(fakeState(overrides));
}
