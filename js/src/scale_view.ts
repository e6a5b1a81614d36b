import { shownStep } from "./actions";
import { cssGradient } from "./colormap";
import { scaleRange, shownAttention } from "./data";
import { type Cleanup, h, type Model, onChanges } from "./model";
import { COLORMAP_NAME } from "./schema";

/** A value for a scale label: 3 significant digits, no trailing zeros. */
export function formatValue(value: number): string {
  if (!Number.isFinite(value)) return "?";
  if (value === 0) return "0";
  const abs = Math.abs(value);
  if (abs >= 1e4 || abs < 1e-3) return value.toExponential(1);
  return String(Number(value.toPrecision(3)));
}

/**
 * The colour scale beside the image (`el`): colour map with the values of its two ends;
 * what a value means and how maps were normalised go in a line under the image (`textEl`).
 */
export function scaleView(model: Model, el: HTMLElement, textEl: HTMLElement): Cleanup {
  const box = h("figure", "dw-scale");
  box.setAttribute("aria-label", "colour scale");
  const high = h("span", "dw-scale-high");
  const bar = h("div", "dw-scale-bar");
  bar.style.background = cssGradient();
  bar.setAttribute("role", "img");
  const low = h("span", "dw-scale-low");
  box.append(high, bar, low);
  el.appendChild(box);
  const meaning = h("p", "dw-scale-meaning");
  meaning.setAttribute("aria-label", "colour scale meaning");
  textEl.appendChild(meaning);

  const update = (): void => {
    const overlay = model.get("overlay");
    const range = scaleRange({
      overlay,
      step: shownStep(model),
      token: model.get("token"),
      attention: shownAttention(model),
      overlays: model.get("overlays"),
    });
    box.hidden = range === null;
    meaning.hidden = range === null;
    if (!range) return;
    const info = model.get("scales")[overlay];
    // The drawn map runs from 0 (transparent) to 1 (the map's maximum): label both ends.
    high.textContent = formatValue(range[1]);
    low.textContent = formatValue(range[0]);
    const span = `${COLORMAP_NAME}, ${low.textContent} (transparent) to ${high.textContent}`;
    meaning.textContent = info
      ? `Colour: ${span}: ${info.meaning}; ${info.normalisation}.`
      : `Colour: ${span}.`;
    box.dataset.overlay = overlay;
    box.dataset.low = String(range[0]);
    box.dataset.high = String(range[1]);
    bar.setAttribute(
      "aria-label",
      `${COLORMAP_NAME} colour map from ${low.textContent} (transparent) to ${high.textContent}`,
    );
    box.title = meaning.textContent;
  };
  const off = onChanges(
    model,
    [
      "overlay",
      "step",
      "token",
      "attention",
      "attention_filtered",
      "attention_layer",
      "attention_head",
      "overlays",
      "scales",
      "timesteps",
    ],
    update,
  );
  update();
  return () => {
    off();
    box.remove();
    meaning.remove();
  };
}
