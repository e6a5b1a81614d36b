import type {
  ArrayPayload,
  FaithfulnessEntry,
  GridData,
  HeavyOverlay,
  OverlayKind,
  WidgetState,
} from "./schema";
import { HEAVY_OVERLAYS } from "./schema";

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

/** Whether an overlay kind is computed on request in the kernel. */
export function isHeavy(kind: string): kind is HeavyOverlay {
  return (HEAVY_OVERLAYS as readonly string[]).includes(kind);
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

/** Check a payload's buffer against dtype and shape; returns an error text or null. */
export function checkPayload(payload: ArrayPayload | null | undefined): string | null {
  if (!payload) return null;
  if (!(payload.data instanceof DataView)) return "its binary buffer did not arrive";
  const itemsize = payload.dtype === "uint8" ? 1 : 4;
  const expected = size(payload.shape) * itemsize;
  if (payload.data.byteLength !== expected) {
    return `buffer holds ${payload.data.byteLength} bytes, ${payload.dtype} [${payload.shape}] needs ${expected}`;
  }
  return null;
}

function fromBase64(text: string): DataView {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return new DataView(bytes.buffer);
}

/**
 * Turn every buffer in `value` into a DataView, in place: `{"$b64": text}` (exported files,
 * the base64 transport), ArrayBuffers and typed arrays (some widget managers deliver those).
 * Returns the value, or the replacement when `value` itself was a buffer.
 */
export function ensureBinary(value: unknown): unknown {
  if (value instanceof DataView) return value;
  if (value instanceof ArrayBuffer) return new DataView(value);
  if (ArrayBuffer.isView(value))
    return new DataView(value.buffer, value.byteOffset, value.byteLength);
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) value[i] = ensureBinary(value[i]);
    return value;
  }
  if (value && typeof value === "object") {
    const record = value as Record<string, unknown>;
    if (typeof record.$b64 === "string" && Object.keys(record).length === 1) {
      return fromBase64(record.$b64);
    }
    for (const key of Object.keys(record)) record[key] = ensureBinary(record[key]);
  }
  return value;
}

/** Whether any array payload inside `value` lacks its buffer (nested search). */
export function buffersMissing(value: unknown): boolean {
  if (!value || typeof value !== "object" || value instanceof DataView) return false;
  if (Array.isArray(value)) return value.some(buffersMissing);
  const record = value as Record<string, unknown>;
  if ("dtype" in record && "shape" in record) {
    if (checkPayload(record as unknown as ArrayPayload) === "its binary buffer did not arrive") {
      return true;
    }
  }
  return Object.values(record).some(buffersMissing);
}

/** The RGB image of `step` from uint8 [N, H, W, 3] previews. */
export function frameAt(payload: ArrayPayload | null, step: number): RgbFrame | null {
  if (payload?.shape.length !== 4 || checkPayload(payload)) return null;
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
  if (payload?.shape.length !== 4 || checkPayload(payload)) return null;
  const [n, t, height, width] = payload.shape as [number, number, number, number];
  if (step < 0 || step >= n || token < 0 || token >= t) return null;
  const cells = width * height;
  const start = (step * t + token) * cells;
  return { width, height, values: bytesOf(payload).subarray(start, start + cells) };
}

/** The dequantisation scale of element `index` of a payload's leading axes (1 if none). */
export function scaleAt(payload: ArrayPayload | null, index: number): number {
  const scale = payload?.scale;
  if (!scale || checkPayload(scale)) return 1;
  return float32Of(scale)[index] ?? 1;
}

/** The heavy overlay map of `kind` at `step`, if it has been computed. */
export function heavyAt(
  overlays: WidgetState["overlays"],
  kind: HeavyOverlay,
  step: number,
): MapSlice | null {
  const set = overlays?.[kind];
  if (!set || checkPayload(set.maps)) return null;
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

/** The values at the low and high end of the colour scale for the shown map. */
export function scaleRange(
  state: Pick<WidgetState, "overlay" | "step" | "token" | "attention" | "overlays">,
): [number, number] | null {
  if (!overlayMap(state)) return null;
  if (state.overlay === "attention") {
    const t = state.attention?.shape[1] ?? 0;
    return [0, scaleAt(state.attention, state.step * t + state.token)];
  }
  if (!isHeavy(state.overlay)) return null;
  const set = state.overlays[state.overlay];
  const index = set?.steps.indexOf(state.step) ?? -1;
  return set && index >= 0 ? (set.ranges[index] ?? [0, 1]) : null;
}

/** Cell (layer, step index, token) of a grid: g x g uint8 values. */
export function gridCell(
  grid: GridData,
  layer: number,
  column: number,
  token: number,
): MapSlice | null {
  if (grid.maps.shape.length !== 5 || checkPayload(grid.maps)) return null;
  const [nl, ns, nt, height, width] = grid.maps.shape as [number, number, number, number, number];
  const t = grid.per_token ? token : 0;
  if (layer < 0 || layer >= nl || column < 0 || column >= ns || t < 0 || t >= nt) return null;
  const cells = width * height;
  const start = ((layer * ns + column) * nt + t) * cells;
  return { width, height, values: bytesOf(grid.maps).subarray(start, start + cells) };
}

/** The faithfulness entry computed for the map shown now, if any. */
export function faithfulnessFor(
  state: Pick<
    WidgetState,
    | "faithfulness"
    | "overlay"
    | "step"
    | "token"
    | "attention_layer"
    | "attention_head"
    | "saliency_layer"
  >,
): FaithfulnessEntry | null {
  const attention = state.overlay === "attention";
  const layer = attention ? state.attention_layer : state.saliency_layer;
  return (
    state.faithfulness.find(
      (e) =>
        e.overlay === state.overlay &&
        e.step === state.step &&
        e.layer === layer &&
        (!attention || (e.token === state.token && e.head === state.attention_head)),
    ) ?? null
  );
}
