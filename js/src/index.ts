import type { RenderProps } from "@anywidget/types";
import { captionView } from "./caption_view";
import { controlsView } from "./controls_view";
import { curvesView } from "./curves_view";
import {
  attentionCache,
  buffersMissing,
  checkPayload,
  ensureBinary,
  rememberAttention,
} from "./data";
import { faithfulnessView } from "./faithfulness_view";
import { gridSourcesView } from "./grid_sources_view";
import { gridView } from "./grid_view";
import { imageView } from "./image_view";
import { decodeState, LocalModel } from "./local_model";
import { type Cleanup, h, type Model, onChanges } from "./model";
import { scaleView } from "./scale_view";
import { PAYLOAD_TRAITS, type WidgetState } from "./schema";
import { sliderView } from "./slider_view";
import { statusView } from "./status_view";
import { STYLES } from "./styles";
import { switchView } from "./switch_view";
import { tokensView } from "./tokens_view";

/**
 * Keep every payload binary: base64 buffers (the fallback transport) and other buffer types
 * become DataViews in place, before any view redraws. When buffers did not arrive at all
 * (a widget manager that drops them, colab-cdn-widget-manager#33), ask the kernel once to
 * send base64 instead.
 */
export function payloadGuard(model: Model): Cleanup {
  let asked = false;
  const check = (): void => {
    for (const key of PAYLOAD_TRAITS) ensureBinary(model.get(key));
    // Every filter's maps the kernel sent stay in the view: going back to one is instant.
    rememberAttention(attentionCache(model), model.get("attention_filtered"));
    if (asked || model.get("transport") === "base64") return;
    const missing = PAYLOAD_TRAITS.filter((key) => buffersMissing(model.get(key)));
    if (missing.length > 0) {
      asked = true;
      console.warn(`diffwidget: buffers of ${missing.join(", ")} did not arrive; using base64`);
      model.send({ kind: "buffers_missing" });
    }
  };
  const off = onChanges(model, [...PAYLOAD_TRAITS, "transport"] as (keyof WidgetState)[], check);
  check();
  return off;
}

/** Lay out the explorer in `el` and wire every view to `model`; returns the teardown. */
export function mount(model: Model, el: HTMLElement): Cleanup {
  const guard = payloadGuard(model); // first: it must run before the views redraw
  const style = document.createElement("style");
  style.textContent = STYLES;
  const root = h("div", "dw-root");
  root.tabIndex = 0; // keyboard arrows move the step once the widget has focus
  root.setAttribute("role", "application");
  root.setAttribute("aria-label", "diffusion explorer");
  const left = h("div", "dw-left");
  const view = h("div", "dw-view");
  const right = h("div", "dw-right");
  const bottom = h("div", "dw-bottom");
  const prompt = h("div", "dw-prompt", model.get("prompt"));
  prompt.setAttribute("aria-label", "prompt");
  right.appendChild(prompt);
  left.appendChild(view);
  root.append(left, right);
  el.append(style, root);
  for (const key of ["previews", "noisy_previews"] as const) {
    const problem = checkPayload(model.get(key));
    if (problem) console.warn(`diffwidget: ${key}: ${problem}`);
  }
  const cleanups: Cleanup[] = [
    guard,
    imageView(model, view),
    scaleView(model, view, left),
    captionView(model, left),
    controlsView(model, right, () => root.querySelector(".dw-canvas")),
    tokensView(model, right),
    curvesView(model, right),
    switchView(model, right),
    // A panel of its own: under the image beside the controls, after the curves when stacked.
    faithfulnessView(model, root),
  ];
  root.appendChild(bottom);
  cleanups.push(sliderView(model, root, root), statusView(model, root));
  cleanups.push(gridSourcesView(model, bottom), gridView(model, bottom));
  return () => {
    for (const cleanup of cleanups.reverse()) cleanup();
    root.remove();
    style.remove();
  };
}

function render({ model, el }: RenderProps<WidgetState>): Cleanup {
  return mount(model, el);
}

/** Render exported state without a kernel (standalone HTML; `data`: its inflated data block). */
export function renderStandalone(json: unknown, el: HTMLElement, data?: Uint8Array): LocalModel {
  const model = new LocalModel(decodeState(json, data));
  mount(model.asModel(), el);
  return model;
}

export { decodeState, LocalModel };
export default { render };
