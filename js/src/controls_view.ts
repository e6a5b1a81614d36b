import { overlayName, requestAction, requestConcept, setValue } from "./actions";
import { isHeavy } from "./data";
import { exportPng } from "./image_view";
import { type Cleanup, h, type Model, onChanges } from "./model";
import {
  CONCEPT_MAX_CHARS,
  IMAGE_MODES,
  type ImageMode,
  type LayerOption,
  MEAN_OVER_HEADS,
  OVERLAY_KINDS,
  type OverlayKind,
} from "./schema";

const MODE_NAMES: Record<ImageMode, string> = { x0: "predicted x̂0", noisy: "noisy x_t" };

function fill(select: HTMLSelectElement, options: LayerOption[], value: string): void {
  select.replaceChildren();
  for (const option of options) {
    const node = h("option", "", option.label);
    node.value = option.value;
    select.appendChild(node);
  }
  select.value = value;
}

/** A button with its visible text, its accessible name and an optional tooltip. */
function button(
  cls: string,
  text: string,
  label: string,
  title = "",
  type: "button" | "submit" = "button",
): HTMLButtonElement {
  const el = h("button", cls, text);
  el.type = type;
  if (title) el.title = title;
  el.setAttribute("aria-label", label);
  return el;
}

/** Image mode, overlay, its layer/head filters, opacity, grid, exact decode, PNG export. */
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
  const layer = h("select", "dw-layer");
  layer.setAttribute("aria-label", "layers");
  const head = h("select", "dw-head");
  head.setAttribute("aria-label", "attention head");
  const opacity = h("input", "dw-opacity");
  opacity.type = "range";
  opacity.min = "0";
  opacity.max = "1";
  opacity.step = "0.05";
  opacity.setAttribute("aria-label", "overlay opacity");
  const grid = button("dw-grid-toggle", "layer × step grid", "show the layer × step grid");
  const exact = button(
    "dw-exact",
    "exact decode",
    "decode this step with the full VAE",
    "Decode this step's x̂0 with the full VAE (the slider shows fast previews)",
  );
  const png = button(
    "dw-png",
    "PNG",
    "save the current view as PNG",
    "Save the current view as PNG",
  );
  const opacityLabel = h("label", "dw-opacity-label", "opacity ");
  opacityLabel.appendChild(opacity);
  // Any word, mapped in the kernel (ConceptAttention); shown only as text.
  const concept = h("form", "dw-concept");
  const word = h("input", "dw-concept-word");
  word.type = "text";
  word.maxLength = CONCEPT_MAX_CHARS;
  word.placeholder = "concept word";
  word.setAttribute("aria-label", "concept word");
  const mapWord = button(
    "dw-concept-map",
    "map",
    "map this concept word",
    "Show where this word is at this step (ConceptAttention concept map)",
    "submit",
  );
  concept.append(word, mapWord);
  row.append(mode, overlay, layer, head, opacityLabel, concept, grid, exact, png);
  el.appendChild(row);

  const gridSource = (): OverlayKind => {
    const kind = model.get("overlay");
    if (kind === "attention") return "attention";
    if (isHeavy(kind) && (model.get("layer_options").saliency[kind] ?? []).length > 0) return kind;
    return model.get("available").includes("attention") ? "attention" : "none";
  };

  const update = (): void => {
    const available = model.get("available");
    const kind = model.get("overlay");
    overlay.replaceChildren();
    for (const option of OVERLAY_KINDS) {
      if (!available.includes(option) && option !== kind) continue;
      const node = h("option", "", overlayName(option));
      node.value = option;
      overlay.appendChild(node);
    }
    overlay.value = kind;
    mode.value = model.get("image_mode");
    opacity.value = String(model.get("opacity"));
    const options = model.get("layer_options");
    const layerOptions =
      kind === "attention"
        ? options.attention
        : isHeavy(kind)
          ? (options.saliency[kind] ?? [])
          : [];
    const layerValue =
      kind === "attention" ? model.get("attention_layer") : model.get("saliency_layer");
    fill(layer, layerOptions, layerValue);
    layer.hidden = layerOptions.length < 2;
    layer.setAttribute("aria-label", `${overlayName(kind)} layers`);
    const heads: LayerOption[] = [{ value: String(MEAN_OVER_HEADS), label: "mean over heads" }];
    for (let k = 0; k < options.heads; k++) heads.push({ value: String(k), label: `head ${k}` });
    fill(head, heads, String(model.get("attention_head")));
    head.hidden = kind !== "attention" || options.heads === 0;
    const open = model.get("grid") !== "none";
    grid.classList.toggle("dw-active", open);
    grid.setAttribute("aria-pressed", String(open));
    grid.hidden = gridSource() === "none";
    exact.hidden =
      !model.get("actions").includes("decode_step") || model.get("image_mode") !== "x0";
    // A kernel-less export shows the maps it holds but cannot map new words.
    concept.hidden = !available.includes("concept") || !model.get("actions").includes("cancel");
    if (document.activeElement !== word) word.value = model.get("concept");
  };
  const onOverlay = (): void => {
    const kind = overlay.value as OverlayKind;
    // An open grid follows the overlay when the new one has per-layer maps (the kernel
    // sends the new grid; a kernel-less export keeps the grid it was saved with).
    setValue(model, "overlay", kind);
    const kernel = model.get("actions").length > 0;
    if (kernel && model.get("grid") !== "none" && gridSource() !== model.get("grid")) {
      setValue(model, "grid", gridSource());
    }
  };
  const onLayer = (): void => {
    const key = model.get("overlay") === "attention" ? "attention_layer" : "saliency_layer";
    setValue(model, key, layer.value);
  };
  const onHead = (): void => setValue(model, "attention_head", Number(head.value));
  const onMode = (): void => setValue(model, "image_mode", mode.value as ImageMode);
  const onOpacity = (): void => setValue(model, "opacity", Number(opacity.value));
  const onGrid = (): void =>
    setValue(model, "grid", model.get("grid") === "none" ? gridSource() : "none");
  const onExact = (): void => requestAction(model, "decode_step");
  const onConcept = (event: Event): void => {
    event.preventDefault();
    if (word.value.trim()) requestConcept(model, word.value);
  };
  const onWordKey = (event: KeyboardEvent): void => {
    // Typing is for the box: not the slider's keys (space plays, arrows step) nor the
    // notebook's shortcuts, which would also swallow Enter.
    event.stopPropagation();
    if (event.key === "Enter") onConcept(event);
  };
  const onPng = (): void => {
    const target = canvas();
    if (target) exportPng(target, `diffwidget-step-${model.get("step")}.png`);
  };
  overlay.addEventListener("change", onOverlay);
  layer.addEventListener("change", onLayer);
  head.addEventListener("change", onHead);
  mode.addEventListener("change", onMode);
  opacity.addEventListener("input", onOpacity);
  grid.addEventListener("click", onGrid);
  exact.addEventListener("click", onExact);
  png.addEventListener("click", onPng);
  concept.addEventListener("submit", onConcept);
  word.addEventListener("keydown", onWordKey);
  const off = onChanges(
    model,
    [
      "available",
      "overlay",
      "image_mode",
      "opacity",
      "layer_options",
      "attention_layer",
      "attention_head",
      "saliency_layer",
      "grid",
      "actions",
      "concept",
    ],
    update,
  );
  update();
  return () => {
    off();
    row.remove();
  };
}
