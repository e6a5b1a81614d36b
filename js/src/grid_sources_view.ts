import { isHeavy } from "./data";
import { gridSourceLabel } from "./grid_cells";
import { type Cleanup, h, type Model, onChanges } from "./model";
import { CONCEPT_MAX_CHARS, GRID_SOURCES, type GridSource, type WidgetState } from "./schema";

/** The grid sources this state can show: what it holds maps for, and what the kernel computes. */
export function gridSources(
  state: Pick<WidgetState, "available" | "actions" | "layer_options" | "grid">,
): GridSource[] {
  const kernel = state.actions.includes("cancel");
  return GRID_SOURCES.filter((source) => {
    if (source === state.grid || source === "none") return true;
    if (source === "attention") return state.available.includes("attention");
    if (source === "concept" || source === "patching") {
      return kernel && state.available.includes("concept"); // both run the pipeline
    }
    return isHeavy(source) && (state.layer_options.saliency[source] ?? []).length > 0;
  });
}

/**
 * The grid's source menu, and the two words of the causal grid (a word of the prompt and
 * its replacement: the kernel checks them, computes the grid with a progress bar and
 * cancel, and says in `error` what is wrong). The concept grid takes the concept box's word.
 */
export function gridSourcesView(model: Model, el: HTMLElement): Cleanup {
  const bar = h("div", "dw-grid-sources");
  const label = h("label", "dw-grid-source-label", "layer × step grid: ");
  const menu = h("select", "dw-grid-source");
  menu.setAttribute("aria-label", "layer × step grid source");
  label.appendChild(menu);
  const patch = h("form", "dw-patch");
  const word = h("input", "dw-patch-word");
  const replacement = h("input", "dw-patch-replacement");
  for (const [input, text] of [
    [word, "word of the prompt"],
    [replacement, "replacement word"],
  ] as const) {
    input.type = "text";
    input.maxLength = CONCEPT_MAX_CHARS;
    input.placeholder = text;
    input.setAttribute("aria-label", text);
  }
  const go = h("button", "dw-patch-go", "patch");
  go.type = "submit";
  go.title = "Compute the causal grid: patch the prompt with the replacement, layer by step";
  patch.append(word, h("span", "", " → "), replacement, go);
  const note = h("span", "dw-grid-concept-note");
  bar.append(label, patch, note);
  el.appendChild(bar);

  const update = (): void => {
    const grid = model.get("grid");
    const sources = gridSources({
      available: model.get("available"),
      actions: model.get("actions"),
      layer_options: model.get("layer_options"),
      grid,
    });
    menu.replaceChildren();
    for (const source of sources) {
      const option = h("option", "", gridSourceLabel(source));
      option.value = source;
      menu.appendChild(option);
    }
    menu.value = grid;
    // Shown with the grid open, or where the kernel can compute a grid the toggle cannot open.
    const computes = sources.includes("concept") && sources.includes("patching");
    bar.hidden = sources.length < 2 || (grid === "none" && !computes);
    patch.hidden = grid !== "patching";
    const concept = model.get("concept");
    note.hidden = grid !== "concept";
    note.textContent = concept
      ? `the concept box's word: “${concept}”`
      : "type a word in the concept box above";
  };
  // The boxes follow the kernel's words only when those change: another trait's echo must
  // not wipe what is being typed.
  const syncWords = (): void => {
    for (const [input, key] of [
      [word, "patch_word"],
      [replacement, "patch_replacement"],
    ] as const) {
      if (document.activeElement !== input) input.value = model.get(key);
    }
  };
  const onMenu = (): void => {
    model.set("grid", menu.value as GridSource);
    model.save_changes();
  };
  const onPatch = (event: Event): void => {
    event.preventDefault();
    // Both read before either is set: setting one refreshes the boxes from the model.
    const pair = [word.value.trim(), replacement.value.trim()] as const;
    if (!pair[0] || !pair[1]) return;
    // One sync with both words: the kernel sees the pair, never half of a new one.
    model.set("patch_word", pair[0]);
    model.set("patch_replacement", pair[1]);
    model.save_changes();
  };
  // Typing is for the boxes, not the slider's keys nor the notebook's shortcuts.
  const onKey = (event: KeyboardEvent): void => {
    event.stopPropagation();
    if (event.key === "Enter") onPatch(event);
  };
  menu.addEventListener("change", onMenu);
  patch.addEventListener("submit", onPatch);
  word.addEventListener("keydown", onKey);
  replacement.addEventListener("keydown", onKey);
  const off = onChanges(
    model,
    ["grid", "available", "actions", "layer_options", "concept"],
    update,
  );
  const offWords = onChanges(model, ["patch_word", "patch_replacement"], syncWords);
  update();
  syncWords();
  return () => {
    off();
    offWords();
    bar.remove();
  };
}
