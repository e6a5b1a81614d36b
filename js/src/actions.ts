import type { Model } from "./model";
import type { WidgetState } from "./schema";

/** Number of steps in the trace shown. */
export function stepCount(model: Model): number {
  return model.get("timesteps").length;
}

/** Clamp to a valid loop index. */
export function clampStep(value: number, n: number): number {
  if (!Number.isFinite(value) || n <= 0) return 0;
  return Math.min(n - 1, Math.max(0, Math.round(value)));
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
  setStep(model, model.get("step") + delta);
}

/** Select a token; with no overlay shown, switch to its attention map. */
export function selectToken(model: Model, token: number): void {
  model.set("token", token);
  if (model.get("overlay") === "none" && model.get("available").includes("attention")) {
    model.set("overlay", "attention");
  }
  model.save_changes();
}

/** Set one writable trait and sync it. */
export function setValue<K extends "overlay" | "opacity" | "image_mode" | "show_special">(
  model: Model,
  key: K,
  value: WidgetState[K],
): void {
  model.set(key, value);
  model.save_changes();
}

/** Ask the kernel to stop the running computation. */
export function requestCancel(model: Model): void {
  model.send({ kind: "cancel" });
}

/** Whether a token chip is shown (start/end/pad only on request). */
export function tokenVisible(kind: string, showSpecial: boolean): boolean {
  return showSpecial || kind === "word";
}

const OVERLAY_NAMES: Record<string, string> = {
  none: "No overlay",
  attention: "Token attention",
  df_rise: "DF-RISE",
  df_cam: "DF-CAM",
};

/** Human name of an overlay kind. */
export function overlayName(kind: string): string {
  return OVERLAY_NAMES[kind] ?? kind;
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
  >,
): string {
  const n = state.timesteps.length;
  const t = state.timesteps[state.step];
  const parts = [`Step ${state.step} of ${n - 1} (scheduler t = ${t ?? "?"}).`];
  parts.push(`${state.descriptions[state.image_mode] ?? state.image_mode}.`);
  if (state.overlay === "attention") {
    const token = state.tokens[state.token] ?? "?";
    parts.push(`Overlay for token “${token}”: ${state.descriptions.attention ?? "attention"}.`);
  } else if (state.overlay === "df_rise" || state.overlay === "df_cam") {
    const set = state.overlays[state.overlay];
    if (set?.steps.includes(state.step)) parts.push(`Overlay: ${set.description}.`);
    else parts.push(`${overlayName(state.overlay)} is not computed for step ${state.step} yet.`);
  }
  return parts.join(" ");
}
