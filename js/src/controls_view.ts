import { overlayName, setValue } from "./actions";
import { exportPng } from "./image_view";
import { type Cleanup, h, type Model, onChanges } from "./model";
import { IMAGE_MODES, type ImageMode, OVERLAY_KINDS, type OverlayKind } from "./schema";

const MODE_NAMES: Record<ImageMode, string> = { x0: "predicted x̂0", noisy: "noisy x_t" };

/** Overlay selector, opacity, image mode and PNG export. */
export function controlsView(
  model: Model,
  el: HTMLElement,
  canvas: () => HTMLCanvasElement | null,
): Cleanup {
  const row = h("div", "dw-controls");
  const overlay = h("select", "dw-overlay");
  overlay.setAttribute("aria-label", "overlay");
  const mode = h("select", "dw-mode");
  mode.setAttribute("aria-label", "image");
  for (const kind of IMAGE_MODES) {
    const option = h("option", "", MODE_NAMES[kind]);
    option.value = kind;
    mode.appendChild(option);
  }
  const opacity = h("input", "dw-opacity");
  opacity.type = "range";
  opacity.min = "0";
  opacity.max = "1";
  opacity.step = "0.05";
  opacity.setAttribute("aria-label", "overlay opacity");
  const png = h("button", "dw-png", "PNG");
  png.type = "button";
  png.title = "Save the current view as PNG";
  const opacityLabel = h("label", "dw-opacity-label", "opacity ");
  opacityLabel.appendChild(opacity);
  row.append(mode, overlay, opacityLabel, png);
  el.appendChild(row);

  const update = (): void => {
    const available = model.get("available");
    overlay.replaceChildren();
    for (const kind of OVERLAY_KINDS) {
      if (!available.includes(kind) && kind !== model.get("overlay")) continue;
      const option = h("option", "", overlayName(kind));
      option.value = kind;
      overlay.appendChild(option);
    }
    overlay.value = model.get("overlay");
    mode.value = model.get("image_mode");
    opacity.value = String(model.get("opacity"));
  };
  const onOverlay = (): void => setValue(model, "overlay", overlay.value as OverlayKind);
  const onMode = (): void => setValue(model, "image_mode", mode.value as ImageMode);
  const onOpacity = (): void => setValue(model, "opacity", Number(opacity.value));
  const onPng = (): void => {
    const target = canvas();
    if (target) exportPng(target, `diffwidget-step-${model.get("step")}.png`);
  };
  overlay.addEventListener("change", onOverlay);
  mode.addEventListener("change", onMode);
  opacity.addEventListener("input", onOpacity);
  png.addEventListener("click", onPng);
  const off = onChanges(model, ["available", "overlay", "image_mode", "opacity"], update);
  update();
  return () => {
    off();
    row.remove();
  };
}
