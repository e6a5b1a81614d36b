import type { RenderProps } from "@anywidget/types";
import { captionView } from "./caption_view";
import { controlsView } from "./controls_view";
import { curvesView } from "./curves_view";
import { checkPayload } from "./data";
import { imageView } from "./image_view";
import { decodeState, LocalModel } from "./local_model";
import { type Cleanup, h, type Model } from "./model";
import type { WidgetState } from "./schema";
import { sliderView } from "./slider_view";
import { statusView } from "./status_view";
import { STYLES } from "./styles";
import { tokensView } from "./tokens_view";

/** Lay out the explorer in `el` and wire every view to `model`; returns the teardown. */
export function mount(model: Model, el: HTMLElement): Cleanup {
  const style = document.createElement("style");
  style.textContent = STYLES;
  const root = h("div", "dw-root");
  root.tabIndex = 0; // keyboard arrows move the step once the widget has focus
  const left = h("div", "dw-left");
  const right = h("div", "dw-right");
  const prompt = h("div", "dw-prompt", model.get("prompt"));
  right.appendChild(prompt);
  root.append(left, right);
  el.append(style, root);
  for (const key of ["previews", "noisy_previews", "attention"] as const) {
    const problem = checkPayload(model.get(key));
    if (problem) console.warn(`diffwidget: ${key}: ${problem}`);
  }
  const cleanups: Cleanup[] = [
    imageView(model, left),
    captionView(model, left),
    controlsView(model, right, () => root.querySelector("canvas")),
    tokensView(model, right),
    curvesView(model, right),
    sliderView(model, root, root),
    statusView(model, root),
  ];
  return () => {
    for (const cleanup of cleanups.reverse()) cleanup();
    root.remove();
    style.remove();
  };
}

function render({ model, el }: RenderProps<WidgetState>): Cleanup {
  return mount(model, el);
}

/** Render exported state without a kernel (standalone HTML). */
export function renderStandalone(json: unknown, el: HTMLElement): LocalModel {
  const model = new LocalModel(decodeState(json));
  mount(model.asModel(), el);
  return model;
}

export { decodeState, LocalModel };
export default { render };
