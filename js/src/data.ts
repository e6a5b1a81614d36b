import type {
  ArrayPayload,
  AttentionSet,
  ComputedOverlay,
  FaithfulnessEntry,
  GridData,
  GridGroup,
  HeavyOverlay,
  OverlayKind,
  WidgetState,
} from "./schema";
import { COMPUTED_OVERLAYS, HEAVY_OVERLAYS, MEAN_OVER_HEADS } from "./schema";

/** A map on its own grid, 0..255 where 255 is the map's own maximum. */
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

/** Whether an overlay kind is a saliency method computed on request in the kernel. */
export function isHeavy(kind: string): kind is HeavyOverlay {
  return (HEAVY_OVERLAYS as readonly string[]).includes(kind);
}

/** Whether an overlay kind's maps come in `overlays` (saliency methods, concept maps). */
export function isComputed(kind: string): kind is ComputedOverlay {
  return (COMPUTED_OVERLAYS as readonly string[]).includes(kind);
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

/** A `{"$buf": [offset, length]}` reference into an exported file's data block. */
function fromBlock(ref: unknown, data: Uint8Array | undefined): DataView {
  const [offset, length] = Array.isArray(ref) ? ref : [];
  if (
    !data ||
    !Number.isInteger(offset) ||
    !Number.isInteger(length) ||
    offset < 0 ||
    length < 0 ||
    offset + length > data.byteLength
  ) {
    throw new Error(`buffer reference ${JSON.stringify(ref)} lies outside the file's data`);
  }
  return new DataView(data.buffer, data.byteOffset + offset, length);
}

/**
 * Turn every buffer in `value` into a DataView, in place: `{"$b64": text}` (the base64
 * transport, older exported files), `{"$buf": [offset, length]}` into `data` (exported files),
 * ArrayBuffers and typed arrays (some widget managers deliver those). Returns the value, or the
 * replacement when `value` itself was a buffer.
 */
export function ensureBinary(value: unknown, data?: Uint8Array): unknown {
  if (value instanceof DataView) return value;
  if (value instanceof ArrayBuffer) return new DataView(value);
  if (ArrayBuffer.isView(value))
    return new DataView(value.buffer, value.byteOffset, value.byteLength);
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) value[i] = ensureBinary(value[i], data);
    return value;
  }
  if (value && typeof value === "object") {
    const record = value as Record<string, unknown>;
    const keys = Object.keys(record);
    if (typeof record.$b64 === "string" && keys.length === 1) return fromBase64(record.$b64);
    if ("$buf" in record && keys.length === 1) return fromBlock(record.$buf, data);
    for (const key of keys) record[key] = ensureBinary(record[key], data);
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

/** The key of an attention filter (layer, head) in the view's cache of received sets. */
export function attentionKey(layer: string, head: number): string {
  return `${head}\u0000${layer}`;
}

/** Attention sets a view has received, by filter (at most ATTENTION_CACHE_SIZE each). */
export const ATTENTION_CACHE_SIZE = 12;
const received = new WeakMap<object, Map<string, AttentionSet>>();

/** The cache of attention sets received by `owner` (a model). */
export function attentionCache(owner: object): Map<string, AttentionSet> {
  let cache = received.get(owner);
  if (!cache) {
    cache = new Map();
    received.set(owner, cache);
  }
  return cache;
}

/** Keep a received set so that switching back to its filter needs no kernel. */
export function rememberAttention(
  cache: Map<string, AttentionSet>,
  set: AttentionSet | null,
): void {
  if (!set || checkPayload(set.maps)) return;
  const key = attentionKey(set.layer, set.head);
  cache.delete(key); // re-inserted last: the most recent
  cache.set(key, set);
  while (cache.size > ATTENTION_CACHE_SIZE) {
    const oldest = cache.keys().next().value;
    if (oldest === undefined) break;
    cache.delete(oldest);
  }
}

/** The attention set of the current filter: the default, the last sent, or a cached one. */
export function pickAttention(
  state: Pick<
    WidgetState,
    "attention" | "attention_filtered" | "attention_layer" | "attention_head"
  >,
  cache?: ReadonlyMap<string, AttentionSet>,
): AttentionSet | null {
  const layer = state.attention_layer;
  const head = state.attention_head;
  if (layer === "" && head === MEAN_OVER_HEADS) return state.attention;
  const sent = state.attention_filtered;
  if (sent && sent.layer === layer && sent.head === head) return sent;
  return cache?.get(attentionKey(layer, head)) ?? null;
}

/** The attention set the view shows now (see `pickAttention`), from `model`'s cache. */
export function shownAttention(model: {
  get<K extends keyof WidgetState>(key: K): WidgetState[K];
}): AttentionSet | null {
  return pickAttention(
    {
      attention: model.get("attention"),
      attention_filtered: model.get("attention_filtered"),
      attention_layer: model.get("attention_layer"),
      attention_head: model.get("attention_head"),
    },
    attentionCache(model),
  );
}

/** The attention map of (step, token) from a set's uint8 [S, T, h, w], on its own grid. */
export function attentionAt(
  set: AttentionSet | null,
  step: number,
  token: number,
): MapSlice | null {
  const payload = set?.maps;
  if (!set || payload?.shape.length !== 4 || checkPayload(payload)) return null;
  const [, t, height, width] = payload.shape as [number, number, number, number];
  const row = set.steps.indexOf(step);
  if (row < 0 || token < 0 || token >= t) return null;
  const cells = width * height;
  const start = (row * t + token) * cells;
  return { width, height, values: bytesOf(payload).subarray(start, start + cells) };
}

/** Source index and weight of each output cell along one axis (half-pixel centres). */
export interface AxisWeights {
  low: Int32Array;
  high: Int32Array;
  frac: Float32Array;
}

const axisTables = new Map<string, AxisWeights>();

/**
 * Bilinear weights from `nIn` to `nOut` cells with the kernel's convention (torch's
 * `align_corners=False`): output centre i maps to (i + 0.5) * nIn / nOut - 0.5, clamped.
 */
export function axisWeights(nIn: number, nOut: number): AxisWeights {
  const key = `${nIn}>${nOut}`;
  const cached = axisTables.get(key);
  if (cached) return cached;
  const low = new Int32Array(nOut);
  const high = new Int32Array(nOut);
  const frac = new Float32Array(nOut);
  const scale = nIn / nOut;
  for (let i = 0; i < nOut; i++) {
    const centre = Math.min(Math.max((i + 0.5) * scale - 0.5, 0), nIn - 1);
    const lo = Math.floor(centre);
    low[i] = lo;
    high[i] = Math.min(lo + 1, nIn - 1);
    frac[i] = centre - lo;
  }
  const table = { low, high, frac };
  axisTables.set(key, table);
  return table;
}

/**
 * Resize a uint8 map (`height` x `width`, row-major) bilinearly to `outHeight` x `outWidth`,
 * separably (rows, then columns), rounding to the nearest code. Non-square grids keep their
 * own aspect: each axis has its own weights. Writes into `out` when given.
 */
export function resizeBilinear(
  map: MapSlice,
  outHeight: number,
  outWidth: number,
  out: Uint8Array = new Uint8Array(outHeight * outWidth),
  scratch: Float32Array = new Float32Array(map.height * outWidth),
): Uint8Array {
  const { width, height, values } = map;
  const cols = axisWeights(width, outWidth);
  const rows = axisWeights(height, outHeight);
  for (let y = 0; y < height; y++) {
    const base = y * width;
    const line = y * outWidth;
    for (let x = 0; x < outWidth; x++) {
      const f = cols.frac[x] as number;
      const a = values[base + (cols.low[x] as number)] as number;
      const b = values[base + (cols.high[x] as number)] as number;
      scratch[line + x] = a + (b - a) * f;
    }
  }
  for (let y = 0; y < outHeight; y++) {
    const f = rows.frac[y] as number;
    const top = (rows.low[y] as number) * outWidth;
    const bottom = (rows.high[y] as number) * outWidth;
    const line = y * outWidth;
    for (let x = 0; x < outWidth; x++) {
      const a = scratch[top + x] as number;
      const b = scratch[bottom + x] as number;
      out[line + x] = Math.round(a + (b - a) * f);
    }
  }
  return out;
}

/** The dequantisation scale of element `index` of a payload's leading axes (1 if none). */
export function scaleAt(payload: ArrayPayload | null, index: number): number {
  const scale = payload?.scale;
  if (!scale || checkPayload(scale)) return 1;
  return float32Of(scale)[index] ?? 1;
}

/** The computed overlay map of `kind` at `step`, if it has been computed. */
export function heavyAt(
  overlays: WidgetState["overlays"],
  kind: ComputedOverlay,
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
  return isComputed(kind) ? heavyAt(state.overlays, kind, state.step) : null;
}

/** The values at the low and high end of the colour scale for the shown map. */
export function scaleRange(
  state: Pick<WidgetState, "overlay" | "step" | "token" | "attention" | "overlays">,
): [number, number] | null {
  if (!overlayMap(state)) return null;
  if (state.overlay === "attention") {
    const set = state.attention;
    const t = set?.maps.shape[1] ?? 0;
    const row = set ? set.steps.indexOf(state.step) : -1;
    return [0, scaleAt(set?.maps ?? null, row * t + state.token)];
  }
  if (!isComputed(state.overlay)) return null;
  const set = state.overlays[state.overlay];
  const index = set?.steps.indexOf(state.step) ?? -1;
  return set && index >= 0 ? (set.ranges[index] ?? [0, 1]) : null;
}

/** Every grid row in display order: its group and its index inside the group. */
export function gridRows(grid: GridData): { group: GridGroup; index: number; row: number }[] {
  const rows: { group: GridGroup; index: number; row: number }[] = [];
  for (const group of grid.groups) {
    group.layers.forEach((_, index) => {
      rows.push({ group, index, row: rows.length });
    });
  }
  return rows;
}

/** Cell (group row, step column, token) of a grid: at most the layer's grid, uint8 values. */
export function groupCell(
  grid: GridData,
  group: GridGroup,
  index: number,
  column: number,
  token: number,
): MapSlice | null {
  const maps = group.maps;
  if (maps.shape.length !== 5 || checkPayload(maps)) return null;
  const [nl, ns, nt, height, width] = maps.shape as [number, number, number, number, number];
  const t = grid.per_token ? grid.tokens.indexOf(token) : 0;
  if (index < 0 || index >= nl || column < 0 || column >= ns || t < 0 || t >= nt) return null;
  const cells = width * height;
  const start = ((index * ns + column) * nt + t) * cells;
  return { width, height, values: bytesOf(maps).subarray(start, start + cells) };
}

/** Cell (row over all groups, step column, token) of a grid, or null when not held. */
export function gridCell(
  grid: GridData,
  row: number,
  column: number,
  token: number,
): MapSlice | null {
  const entry = gridRows(grid)[row];
  return entry ? groupCell(grid, entry.group, entry.index, column, token) : null;
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
