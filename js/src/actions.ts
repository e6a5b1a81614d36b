import { isComputed, isHeavy } from "./data";
import type { Model } from "./model";
import { OVERLAY_LABELS, type OverlayKind, type WidgetState } from "./schema";

/** Number of steps in the trace shown. */
export function stepCount(model: Model): number {
  return model.get("timesteps").length;
}

/** Clamp to a valid loop index (anything that is not a finite number becomes 0). */
export function clampStep(value: unknown, n: number): number {
  const number = typeof value === "number" ? value : Number.NaN;
  if (!Number.isFinite(number) || n <= 0) return 0;
  return Math.min(n - 1, Math.max(0, Math.round(number)));
}

/**
 * The step to draw: the model's value clamped to the trace. A malformed value (a string, NaN,
 * out of range) from another widget or a script never reaches a drawing call; the kernel
 * refuses it and echoes its own value back.
 */
export function shownStep(model: Model): number {
  return clampStep(model.get("step"), stepCount(model));
}

/** Longest gap between two syncs of the step while scrubbing (ms). */
export const SYNC_INTERVAL_MS = 50;

const pendingSync = new WeakMap<Model, { timer: ReturnType<typeof setTimeout>; dirty: boolean }>();

/**
 * Sync local changes to the kernel at most every SYNC_INTERVAL_MS: the first change goes
 * at once, later ones within the interval are merged into one trailing sync. The view
 * redraws from its own model immediately either way; this only spares the kernel (and
 * the browser's main thread) one message per animation frame while scrubbing.
 */
export function syncSoon(model: Model): void {
  const pending = pendingSync.get(model);
  if (pending) {
    pending.dirty = true;
    return;
  }
  model.save_changes();
  const entry = {
    dirty: false,
    timer: setTimeout(() => {
      pendingSync.delete(model);
      if (entry.dirty) syncSoon(model);
    }, SYNC_INTERVAL_MS),
  };
  pendingSync.set(model, entry);
}

/** Show `value` (clamped) and tell the kernel. Redraws happen on the local change event. */
export function setStep(model: Model, value: number): void {
  const step = clampStep(value, stepCount(model));
  if (step === model.get("step")) return;
  model.set("step", step);
  syncSoon(model);
}

/** Move by `delta` steps (keyboard arrows, play). */
export function stepBy(model: Model, delta: number): void {
  setStep(model, shownStep(model) + delta);
}

/** Select a token; with no overlay shown, switch to its attention map. */
export function selectToken(model: Model, token: number): void {
  model.set("token", token);
  if (model.get("overlay") === "none" && model.get("available").includes("attention")) {
    model.set("overlay", "attention");
  }
  model.save_changes();
}

type Settable =
  | "overlay"
  | "opacity"
  | "image_mode"
  | "show_special"
  | "attention_layer"
  | "attention_head"
  | "saliency_layer"
  | "grid";

/** Set one writable trait and sync it. */
export function setValue<K extends Settable>(model: Model, key: K, value: WidgetState[K]): void {
  model.set(key, value);
  model.save_changes();
}

/** Show the concept map of `word` (the kernel checks it and computes the map). */
export function requestConcept(model: Model, word: string): void {
  model.set("concept", word.trim());
  model.set("overlay", "concept");
  model.save_changes();
}

/** Ask the kernel to stop the running computation. */
export function requestCancel(model: Model): void {
  model.send({ kind: "cancel" });
}

/** Ask the kernel for something it does on request ("faithfulness", "decode_step"). */
export function requestAction(model: Model, kind: "faithfulness" | "decode_step"): void {
  model.send({ kind });
}

/** Whether the overlay shown depends on the selected token. */
export function overlayUsesToken(overlay: OverlayKind): boolean {
  return overlay === "attention";
}

/**
 * Jump to a grid cell: its step, its overlay, and its layer as the filter (when the kernel
 * can apply filters; a kernel-less export lists only the filter it was saved with).
 */
export function selectGridCell(
  model: Model,
  source: OverlayKind,
  layer: string,
  step: number,
): void {
  setStep(model, step);
  model.set("overlay", source);
  const options = model.get("layer_options");
  if (source === "attention") {
    if (options.attention.some((o) => o.value === layer)) model.set("attention_layer", layer);
  } else if (isHeavy(source)) {
    if ((options.saliency[source] ?? []).some((o) => o.value === layer)) {
      model.set("saliency_layer", layer);
    }
  }
  model.save_changes();
}

/** Whether a token chip is shown (start/end/pad only on request). */
export function tokenVisible(kind: string, showSpecial: boolean): boolean {
  return showSpecial || kind === "word";
}

/** Human name of an overlay kind (from the schema). */
export function overlayName(kind: string): string {
  return OVERLAY_LABELS[kind as OverlayKind] ?? kind;
}

/** The caption under the image: what is drawn, at which step, and what the overlay aggregates. */
export function captionText(
  state: Pick<
    WidgetState,
    | "step"
    | "token"
    | "overlay"
    | "image_mode"
    | "tokens"
    | "timesteps"
    | "descriptions"
    | "overlays"
    | "attention"
    | "concept"
  >,
): string {
  const n = state.timesteps.length;
  const step = clampStep(state.step, n);
  const t = state.timesteps[step];
  const parts = [`Step ${step} of ${n - 1} (scheduler t = ${t ?? "?"}).`];
  parts.push(`${state.descriptions[state.image_mode] ?? state.image_mode}.`);
  if (state.overlay === "attention") {
    const token = state.tokens[state.token] ?? "?";
    const what = state.attention?.description ?? "waiting for the kernel to send this filter";
    parts.push(`Overlay for token “${token}”: ${what}.`);
  } else if (isComputed(state.overlay)) {
    const set = state.overlays[state.overlay];
    const index = set ? set.steps.indexOf(step) : -1;
    if (set && index >= 0) parts.push(`Overlay: ${set.descriptions[index] ?? ""}.`);
    else if (state.overlay === "concept" && !state.concept) {
      parts.push("Type a word (any word, in the prompt or not) to see its concept map.");
    } else if (state.overlay === "concept") {
      parts.push(`The concept map of “${state.concept}” is not computed for step ${step} yet.`);
    } else parts.push(`${overlayName(state.overlay)} is not computed for step ${step} yet.`);
  }
  return parts.join(" ");
}
