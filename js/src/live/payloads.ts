/**
 * A browser-made run as the explorer's state: the same payloads `Explorer(trace)` sends and
 * `standalone_state` exports (diffwidget/widget/explorer.py, previews.py, codecs.py,
 * explain/attention.py's default aggregation), so every existing view draws it. What the
 * page cannot compute (the kernel's heavy overlays, layer filters) is left out, as in an
 * exported file.
 */
import type { ArrayPayload, CurveSeries, GridData, ScaleInfo, WidgetState } from "../schema";
import type { LiveManifest } from "./manifest";
import type { LiveRun } from "./runtime";
import { roundHalfEven } from "./scheduler";
import type { TokenKind } from "./tokenizer";

/** Facts the Python side owns, handed to the page with the assets. */
export interface PageFacts {
  scales: Record<string, ScaleInfo>;
  function_words: string[];
  /** explain/attention.py attention_kind: "Cross-attention" or "Joint-attention". */
  attention_kind: string;
  /** NORMALISATION_TEXT of the model's normalisation (diffwidget/tracing/facts.py). */
  normalisation_text: string;
  /** AttentionMaps' preferred layer grid ("auto" resolution). */
  preferred_resolution: number;
  /** How a trace shows the all-zero text positions of an absent T5 (tracing/tokens.py). */
  tail_token: string;
  tail_kind: TokenKind;
}

const UINT8_MAX = 255;
const PIXEL_CENTRE = 0.5;

function payload(
  dtype: "uint8" | "float32",
  shape: number[],
  values: Uint8Array | Float32Array,
): ArrayPayload {
  return { dtype, shape, data: new DataView(values.buffer, values.byteOffset, values.byteLength) };
}

/** Linear-interpolation weights [nOut, nIn] with half-pixel centres (align_corners=False). */
export function interpolation(nOut: number, nIn: number): Float64Array {
  const weights = new Float64Array(nOut * nIn);
  if (nOut === nIn) {
    for (let i = 0; i < nOut; i++) weights[i * nIn + i] = 1;
    return weights;
  }
  const scale = nIn / nOut;
  for (let i = 0; i < nOut; i++) {
    const centre = Math.min(Math.max((i + PIXEL_CENTRE) * scale - PIXEL_CENTRE, 0), nIn - 1);
    const low = Math.floor(centre);
    const high = Math.min(low + 1, nIn - 1);
    const frac = centre - low;
    weights[i * nIn + low] += 1 - frac;
    weights[i * nIn + high] += frac;
  }
  return weights;
}

/** Bilinear resize of one [h, w] map (row-major) to [outH, outW]. */
export function upsample(
  map: ArrayLike<number>,
  h: number,
  w: number,
  outH: number,
  outW: number,
): Float64Array {
  const rows = interpolation(outH, h);
  const cols = interpolation(outW, w);
  const tmp = new Float64Array(outH * w);
  for (let i = 0; i < outH; i++) {
    for (let k = 0; k < h; k++) {
      const r = rows[i * h + k];
      if (r === 0) continue;
      for (let j = 0; j < w; j++) tmp[i * w + j] += r * map[k * w + j];
    }
  }
  const out = new Float64Array(outH * outW);
  for (let i = 0; i < outH; i++) {
    for (let j = 0; j < outW; j++) {
      let s = 0;
      for (let k = 0; k < w; k++) s += tmp[i * w + k] * cols[j * w + k];
      out[i * outW + j] = s;
    }
  }
  return out;
}

/** Python's `format(x, "g")` for the numbers shown here (guidance scales). */
export function formatG(x: number): string {
  return String(Number(x.toPrecision(6)));
}

function toUint8(x: number): number {
  return roundHalfEven(Math.min(Math.max(x, 0), 1) * UINT8_MAX);
}

interface Attention {
  maps: Float32Array; // [N, T, h, w]
  mass: Float32Array; // [N, T]
  layers: string[];
  /** The maps' own grid [h, w] (the finest chosen layer's). */
  grid: [number, number];
  description: string;
}

/** "16×16, 8×8"-style text of the layers' grids, sorted as Python sorts the tuples. */
export function gridsText(layers: { grid: [number, number] }[]): string {
  const unique = new Map(layers.map((a) => [`${a.grid[0]}×${a.grid[1]}`, a.grid] as const));
  return [...unique.entries()]
    .sort(([, a], [, b]) => a[0] - b[0] || a[1] - b[1])
    .map(([text]) => text)
    .join(", ");
}

/** The native grid's phrase (explain/attention.py `_grid_phrase`, grid="native"). */
function gridPhrase(size: [number, number], grids: number): string {
  return grids === 1
    ? `on the layers' own ${size[0]}×${size[1]} grid`
    : `upsampled bilinearly to the ${size[0]}×${size[1]} grid of the finest layer`;
}

/**
 * AttentionMaps() with its defaults, as the explorer sends them (`grid="native"`): the
 * preferred-grid layers, every step, probabilities, on the finest chosen layer's own grid.
 */
export function aggregateAttention(run: LiveRun, m: LiveManifest, facts: PageFacts): Attention {
  const n = run.timesteps.length;
  const t = run.selected.length;
  const preferred = m.attention.filter((a) => a.grid[0] === facts.preferred_resolution);
  const chosen = preferred.length > 0 ? preferred : m.attention;
  // The finest grid: the largest area, ties broken by the larger (h, w) as Python's max.
  const size = chosen
    .map((a) => a.grid)
    .reduce((best, g) =>
      g[0] * g[1] > best[0] * best[1] ||
      (g[0] * g[1] === best[0] * best[1] &&
        (g[0] > best[0] || (g[0] === best[0] && g[1] > best[1])))
        ? g
        : best,
    );
  const [h, w] = size;
  const maps = new Float64Array(n * t * h * w);
  const mass = new Float64Array(n * t);
  for (const layer of chosen) {
    const [lh, lw] = layer.grid;
    const perStep = run.attention.get(layer.layer) ?? [];
    for (let s = 0; s < n; s++) {
      const probs = perStep[s]; // [lh * lw, t]
      for (let k = 0; k < t; k++) {
        const map = new Float64Array(lh * lw);
        let sum = 0;
        for (let q = 0; q < lh * lw; q++) {
          map[q] = probs[q * t + k];
          sum += map[q];
        }
        mass[s * t + k] += sum / (lh * lw);
        const up = lh === h && lw === w ? map : upsample(map, lh, lw, h, w);
        const base = (s * t + k) * h * w;
        for (let q = 0; q < h * w; q++) maps[base + q] += up[q];
      }
    }
  }
  const count = chosen.length;
  const grids = new Set(chosen.map((a) => `${a.grid[0]}×${a.grid[1]}`)).size;
  const description =
    `${facts.attention_kind} probability (${facts.normalisation_text}), conditional CFG half, ` +
    `mean over heads, mean of ${count} layer${count !== 1 ? "s" : ""} (grids ${gridsText(chosen)}) ` +
    `${gridPhrase([h, w], grids)}; all ${n} steps, one map per step`;
  return {
    maps: Float32Array.from(maps, (v) => v / count),
    mass: Float32Array.from(mass, (v) => v / count),
    layers: chosen.map((a) => a.layer),
    grid: [h, w],
    description,
  };
}

/** codecs.quantise_uint8: one scale (the maximum) per trailing [h, w] slice. */
export function quantise(
  values: Float32Array,
  sliceSize: number,
): { q: Uint8Array; scale: Float32Array } {
  const slices = values.length / sliceSize;
  const q = new Uint8Array(values.length);
  const scale = new Float32Array(slices);
  for (let s = 0; s < slices; s++) {
    let max = 0;
    for (let i = 0; i < sliceSize; i++) max = Math.max(max, values[s * sliceSize + i]);
    scale[s] = max;
    const safe = max > 0 ? max : 1;
    for (let i = 0; i < sliceSize; i++) {
      // Float32 division as NumPy does it on float32 maps, then rint.
      q[s * sliceSize + i] = roundHalfEven(
        Math.fround(values[s * sliceSize + i] / safe) * UINT8_MAX,
      );
    }
  }
  return { q, scale };
}

/** Solve the symmetric positive system A x = b (n x n, several right-hand sides). */
function solve(a: Float64Array, b: Float64Array, n: number, k: number): Float64Array {
  const m = Float64Array.from(a);
  const x = Float64Array.from(b);
  for (let col = 0; col < n; col++) {
    let pivot = col;
    for (let r = col + 1; r < n; r++)
      if (Math.abs(m[r * n + col]) > Math.abs(m[pivot * n + col])) pivot = r;
    for (let j = 0; j < n; j++)
      [m[col * n + j], m[pivot * n + j]] = [m[pivot * n + j], m[col * n + j]];
    for (let j = 0; j < k; j++)
      [x[col * k + j], x[pivot * k + j]] = [x[pivot * k + j], x[col * k + j]];
    const d = m[col * n + col];
    if (d === 0) continue;
    for (let r = 0; r < n; r++) {
      if (r === col) continue;
      const f = m[r * n + col] / d;
      if (f === 0) continue;
      for (let j = 0; j < n; j++) m[r * n + j] -= f * m[col * n + j];
      for (let j = 0; j < k; j++) x[r * k + j] -= f * x[col * k + j];
    }
  }
  for (let r = 0; r < n; r++) for (let j = 0; j < k; j++) x[r * k + j] /= m[r * n + r] || 1;
  return x;
}

/**
 * One channel of a uint8 [H, W, 3] image on the [h, w] latent grid in [0, 1]: the rounded
 * mean of the pixels each cell covers, as previews.resize_images (PIL's reduce) makes it.
 */
function areaMean(
  image: Uint8Array,
  H: number,
  W: number,
  ch: number,
  h: number,
  w: number,
): Float64Array {
  if (H % h !== 0 || W % w !== 0) {
    const plane = new Float64Array(H * W);
    for (let i = 0; i < H * W; i++) plane[i] = image[i * 3 + ch] / UINT8_MAX;
    return upsample(plane, H, W, h, w);
  }
  const fy = H / h;
  const fx = W / w;
  const count = fy * fx;
  const out = new Float64Array(h * w);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      let sum = 0;
      for (let dy = 0; dy < fy; dy++)
        for (let dx = 0; dx < fx; dx++) sum += image[((y * fy + dy) * W + x * fx + dx) * 3 + ch];
      out[y * w + x] = Math.floor((sum + count / 2) / count) / UINT8_MAX;
    }
  }
  return out;
}

/**
 * previews.noisy_previews without a VAE: a least-squares latent→RGB map fitted on the run's
 * x̂0 latents and previews (both on the latent grid), applied to each noisy latent.
 */
export function noisyPreviews(run: LiveRun, m: LiveManifest): Uint8Array {
  const [h, w] = m.latent_hw;
  const [H, W] = m.image_hw;
  const c = m.latent_channels;
  const n = run.timesteps.length;
  const p = c + 1;
  const ata = new Float64Array(p * p);
  const atb = new Float64Array(p * 3);
  const row = new Float64Array(p);
  for (let s = 0; s < n; s++) {
    const small: Float64Array[] = [0, 1, 2].map((ch) => areaMean(run.previews[s], H, W, ch, h, w));
    for (let cell = 0; cell < h * w; cell++) {
      for (let ch = 0; ch < c; ch++) row[ch] = run.predX0[s][ch * h * w + cell];
      row[c] = 1;
      for (let i = 0; i < p; i++) {
        for (let j = 0; j < p; j++) ata[i * p + j] += row[i] * row[j];
        for (let j = 0; j < 3; j++) atb[i * 3 + j] += row[i] * small[j][cell];
      }
    }
  }
  const weights = Float32Array.from(solve(ata, atb, p, 3));
  const out = new Uint8Array(n * H * W * 3);
  for (let s = 0; s < n; s++) {
    for (let ch = 0; ch < 3; ch++) {
      const plane = new Float64Array(h * w);
      for (let cell = 0; cell < h * w; cell++) {
        let v = weights[c * 3 + ch];
        for (let k = 0; k < c; k++) v += run.latents[s][k * h * w + cell] * weights[k * 3 + ch];
        plane[cell] = Math.fround(v);
      }
      const up = upsample(plane, h, w, H, W);
      for (let i = 0; i < H * W; i++) out[(s * H * W + i) * 3 + ch] = toUint8(Math.fround(up[i]));
    }
  }
  return out;
}

/** Explorer's default token: the first word that is not a function word. */
export function firstContentToken(
  strings: string[],
  kinds: string[],
  functionWords: string[],
): number {
  const words = kinds.flatMap((k, i) => (k === "word" ? [i] : []));
  const skip = new Set(functionWords);
  for (const i of words) {
    if (!skip.has(strings[i].replace("</w>", "").trim().toLowerCase())) return i;
  }
  return words.length > 0 ? words[0] : 0;
}

/** The x̂0 caption (previews.preview_text) for a run decoded by the shipped tiny decoder. */
export function previewText(m: LiveManifest, guidance: number): string {
  let text =
    `Predicted clean image x̂0 at this step, decoded by the tiny preview decoder ` +
    `(${m.preview_decoder}, distilled from the VAE)`;
  if (guidance > 1) {
    text +=
      `, from the guided noise prediction (CFG ${formatG(guidance)}); in early steps ` +
      "guidance can push x̂0's colours away from the final image's";
  }
  return text;
}

export const NOISY_TEXT =
  "Noisy latent x_t entering this step, through a linear latent→RGB map fitted on this " +
  "trace's x̂0 previews (no VAE in the kernel)";

/** Largest side of one grid cell (widget/grid.py GRID_CELL_MAX). */
const GRID_CELL_MAX = 16;
/** Parts of a path of one layer in a numbered container (widget/grid.py _LAYER_DEPTH). */
const LAYER_DEPTH = 3;

/** widget/grid.py `block_of`: the block a module path's row is drawn under. */
export function blockOf(path: string): string {
  const parts = path.split(".");
  return parts.length > LAYER_DEPTH && /^\d+$/.test(parts[1])
    ? `${parts[0]}.${parts[1]}`
    : parts[0];
}

/** widget/grid.py `cell_size`: the layer's grid scaled so its longer side is ≤ the cap. */
function cellSize(grid: [number, number]): [number, number] {
  const scale = Math.min(1, GRID_CELL_MAX / Math.max(grid[0], grid[1]));
  return [Math.max(1, Math.round(grid[0] * scale)), Math.max(1, Math.round(grid[1] * scale))];
}

/** widget/grid.py `shrink_maps` for one map: block means for integer factors, else bilinear. */
function shrink(map: Float64Array, h: number, w: number, cell: [number, number]): Float64Array {
  const [ch, cw] = cell;
  if (ch === h && cw === w) return map;
  if (h % ch !== 0 || w % cw !== 0) return upsample(map, h, w, ch, cw);
  const fy = h / ch;
  const fx = w / cw;
  const out = new Float64Array(ch * cw);
  for (let y = 0; y < h; y++)
    for (let x = 0; x < w; x++) out[Math.floor(y / fy) * cw + Math.floor(x / fx)] += map[y * w + x];
  return out.map((v) => v / (fy * fx));
}

/** widget/grid.py `attention_grid`: every layer × step × token, rows grouped by block. */
export function attentionGrid(run: LiveRun, m: LiveManifest): GridData {
  const n = run.timesteps.length;
  const t = run.selected.length;
  // Runs of consecutive rows with the same block and grid (the model's order is kept).
  const runs: (typeof m.attention)[] = [];
  for (const layer of m.attention) {
    const last = runs.at(-1)?.at(-1);
    const same =
      last !== undefined &&
      blockOf(last.layer) === blockOf(layer.layer) &&
      last.grid[0] === layer.grid[0] &&
      last.grid[1] === layer.grid[1];
    if (same) runs[runs.length - 1].push(layer);
    else runs.push([layer]);
  }
  const groups = runs.map((rows) => {
    const grid: [number, number] = [rows[0].grid[0], rows[0].grid[1]];
    const cell = cellSize(grid);
    const size = cell[0] * cell[1];
    const maps = new Float32Array(rows.length * n * t * size);
    rows.forEach((layer, row) => {
      const perStep = run.attention.get(layer.layer) ?? [];
      for (let s = 0; s < n; s++) {
        for (let k = 0; k < t; k++) {
          const map = new Float64Array(grid[0] * grid[1]);
          for (let q = 0; q < map.length; q++) map[q] = Math.max(0, perStep[s][q * t + k]);
          maps.set(shrink(map, grid[0], grid[1], cell), ((row * n + s) * t + k) * size);
        }
      }
    });
    const { q, scale } = quantise(maps, size);
    const block = blockOf(rows[0].layer);
    return {
      name: block,
      layers: rows.map((a) => a.layer),
      labels: rows.map((a) =>
        a.layer.startsWith(`${block}.`) ? a.layer.slice(block.length + 1) : a.layer,
      ),
      grid,
      maps: {
        ...payload("uint8", [rows.length, n, t, cell[0], cell[1]], q),
        scale: payload("float32", [rows.length, n, t], scale),
      },
    };
  });
  return {
    source: "attention",
    groups,
    steps: run.timesteps.map((_, i) => i),
    tokens: run.selected.map((_, i) => i),
    per_token: true,
    description:
      "Attention of the image to the selected token per captured layer (rows, grouped by " +
      "block) and step (columns), conditional CFG half, mean over heads; each cell is the " +
      `layer's own map, area-averaged to at most ${GRID_CELL_MAX}×${GRID_CELL_MAX}, divided ` +
      "by its own maximum",
  };
}

/** The explorer's whole state for a browser-made run (as `standalone_state` exports it). */
export function stateFromRun(run: LiveRun, m: LiveManifest, facts: PageFacts): WidgetState {
  const [H, W] = m.image_hw;
  const n = run.timesteps.length;
  const strings = run.selected.map((i) => run.tokens.strings[i]);
  const kinds = run.selected.map((i) => run.tokens.kinds[i]);
  const t = strings.length;
  const previews = new Uint8Array(n * H * W * 3);
  run.previews.forEach((p, s) => {
    previews.set(p, s * H * W * 3);
  });
  const attention = aggregateAttention(run, m, facts);
  const [h, w] = attention.grid;
  const { q, scale } = quantise(attention.maps, h * w);
  const values = new Float32Array(t * n);
  for (let k = 0; k < t; k++)
    for (let s = 0; s < n; s++) values[k * n + s] = attention.mass[s * t + k];
  const series: CurveSeries[] = strings.map((name, token) => ({
    name,
    group: "attention_mass",
    token,
  }));
  const count = attention.layers.length;
  return {
    step: n - 1,
    token: firstContentToken(strings, kinds, facts.function_words),
    overlay: "none",
    opacity: 0.6,
    image_mode: "x0",
    show_special: false,
    attention_layer: "",
    attention_head: -1,
    saliency_layer: "",
    concept: "",
    patch_word: "",
    patch_replacement: "",
    grid: "none",
    switch_word: "",
    switch_replacement: "",
    switch_seeds: 1,
    status: "idle",
    progress: 0,
    error: "",
    prompt: run.request.prompt,
    tokens: strings,
    token_kinds: kinds,
    timesteps: run.timesteps,
    switch_words: [],
    available: ["none", "attention"],
    actions: [],
    transport: "binary",
    previews: payload("uint8", [n, H, W, 3], previews),
    exact_steps: [],
    noisy_previews: payload("uint8", [n, H, W, 3], noisyPreviews(run, m)),
    attention: {
      layer: "",
      head: -1,
      grid: [h, w],
      steps: run.timesteps.map((_, i) => i),
      maps: { ...payload("uint8", [n, t, h, w], q), scale: payload("float32", [n, t], scale) },
      description: attention.description,
    },
    attention_filtered: null,
    overlays: {},
    switch: null,
    layer_options: {
      attention: [
        {
          value: "",
          label: `default: ${count} layer${count !== 1 ? "s" : ""} (${gridsText(
            m.attention.filter((a) => attention.layers.includes(a.layer)),
          )})`,
        },
      ],
      saliency: {},
      heads: 0,
    },
    grid_data: null,
    scales: facts.scales,
    faithfulness: [],
    curves: { series, values: payload("float32", [t, n], values) },
    descriptions: {
      x0: previewText(m, run.request.guidance),
      noisy: NOISY_TEXT,
    },
  };
}
