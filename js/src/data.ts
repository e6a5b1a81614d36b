import type { ArrayPayload, OverlayKind, WidgetState } from "./schema";

/** A map on the latent grid, 0..255 where 255 is the map's own maximum. */
export interface MapSlice {
  width: number;
  height: number;
  values: Uint8Array;
}

/** One RGB image. */
export interface RgbFrame {
  width: number;
  height: number;
  rgb: Uint8Array;
}

/** Number of elements of an array of this shape. */
export function size(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** The payload's bytes as a Uint8Array view (no copy). */
export function bytesOf(payload: ArrayPayload): Uint8Array {
  const view = payload.data;
  return new Uint8Array(view.buffer, view.byteOffset, view.byteLength);
}

/** The payload as float32 values (copied when the buffer is not 4-byte aligned). */
export function float32Of(payload: ArrayPayload): Float32Array {
  if (payload.dtype !== "float32") throw new Error(`expected float32, got ${payload.dtype}`);
  const view = payload.data;
  const n = size(payload.shape);
  if (view.byteOffset % 4 === 0) return new Float32Array(view.buffer, view.byteOffset, n);
  return new Float32Array(bytesOf(payload).slice().buffer, 0, n);
}

/** Check a payload's byte length against dtype and shape; returns an error text or null. */
export function checkPayload(payload: ArrayPayload | null | undefined): string | null {
  if (!payload) return null;
  const itemsize = payload.dtype === "uint8" ? 1 : 4;
  const expected = size(payload.shape) * itemsize;
  if (payload.data.byteLength !== expected) {
    return `buffer holds ${payload.data.byteLength} bytes, ${payload.dtype} [${payload.shape}] needs ${expected}`;
  }
  return null;
}

/** The RGB image of `step` from uint8 [N, H, W, 3] previews. */
export function frameAt(payload: ArrayPayload | null, step: number): RgbFrame | null {
  if (payload?.shape.length !== 4) return null;
  const [n, height, width] = payload.shape as [number, number, number, number];
  if (step < 0 || step >= n) return null;
  const frame = width * height * 3;
  return { width, height, rgb: bytesOf(payload).subarray(step * frame, (step + 1) * frame) };
}

/** The attention map of (step, token) from uint8 [N, T, h, w]. */
export function attentionAt(
  payload: ArrayPayload | null,
  step: number,
  token: number,
): MapSlice | null {
  if (payload?.shape.length !== 4) return null;
  const [n, t, height, width] = payload.shape as [number, number, number, number];
  if (step < 0 || step >= n || token < 0 || token >= t) return null;
  const cells = width * height;
  const start = (step * t + token) * cells;
  return { width, height, values: bytesOf(payload).subarray(start, start + cells) };
}

/** The heavy overlay map of `kind` at `step`, if it has been computed. */
export function heavyAt(
  overlays: WidgetState["overlays"],
  kind: "df_rise" | "df_cam",
  step: number,
): MapSlice | null {
  const set = overlays?.[kind];
  if (!set) return null;
  const index = set.steps.indexOf(step);
  if (index < 0) return null;
  const [, height, width] = set.maps.shape as [number, number, number];
  const cells = width * height;
  return { width, height, values: bytesOf(set.maps).subarray(index * cells, (index + 1) * cells) };
}

/** The overlay map to draw for the current state, or null when there is none. */
export function overlayMap(
  state: Pick<WidgetState, "overlay" | "step" | "token" | "attention" | "overlays">,
): MapSlice | null {
  const kind: OverlayKind = state.overlay;
  if (kind === "none") return null;
  if (kind === "attention") return attentionAt(state.attention, state.step, state.token);
  return heavyAt(state.overlays, kind, state.step);
}
