"""The TypeScript interfaces of the structured payloads, written into ``js/src/schema.ts``.

Verbatim TypeScript: the Python side builds these values in :mod:`diffwidget.widget.codecs`
(``ArrayPayload``), :mod:`diffwidget.widget.payloads` (``AttentionSet``, ``GridGroup``,
``GridData``, with one typed record each), :mod:`diffwidget.widget.curves` (``CurveSet``),
:mod:`diffwidget.widget.switch_view` (``SwitchFilmstrip``) and the explorer (the others);
:func:`diffwidget.widget.schema_ts.typescript` puts them beside the generated trait types.
"""

from __future__ import annotations

TS_PAYLOADS = """\
/** An n-d array sent as one binary buffer; `scale` dequantises uint8 data. */
export interface ArrayPayload {
  dtype: Dtype;
  shape: number[];
  /** A DataView; base64 text when `transport` is "base64" (decoded on arrival). */
  data: DataView;
  /** value = q / 255 * scale, one scale per leading index (e.g. [N, T]). */
  scale?: ArrayPayload;
}

/** Heavy overlay maps for the steps computed so far. */
export interface OverlaySet {
  steps: number[];
  maps: ArrayPayload;
  /** Raw [min, max] of each map before normalisation (same order as `steps`). */
  ranges: [number, number][];
  /** The per-layer map shown ('' = the method's combination of its layers). */
  layer: string;
  /** One caption per map (same order as `steps`). */
  descriptions: string[];
}

export interface LayerOption {
  value: string;
  label: string;
}

export interface LayerOptions {
  attention: LayerOption[];
  saliency: Partial<Record<HeavyOverlay, LayerOption[]>>;
  /** Heads recorded per attention layer (0: only the mean over heads was recorded). */
  heads: number;
}

/** Per-token attention under one filter, on the grid it was recorded on (views upsample). */
export interface AttentionSet {
  /** The `attention_layer` filter these maps answer ('' = the default selection). */
  layer: string;
  /** The `attention_head` they answer (-1 = mean over heads). */
  head: number;
  /** The maps' own grid [h, w]: the finest averaged layer's, never larger. */
  grid: [number, number];
  /** Loop index of each row of `maps`. */
  steps: number[];
  /** uint8 [S, T, h, w]; value = q / 255 * scale[S, T]. */
  maps: ArrayPayload;
  description: string;
}

/** Grid rows that share a block (module-path prefix) and a spatial grid. */
export interface GridGroup {
  /** The shared prefix, e.g. "down_blocks.2" or "single_transformer_blocks". */
  name: string;
  /** Full module paths of the rows. */
  layers: string[];
  /** Each path after the prefix. */
  labels: string[];
  /** The rows' own spatial grid [h, w]. */
  grid: [number, number];
  /** uint8 [L, S, T, h, w], h x w at most `grid`; each map divided by its own maximum. */
  maps: ArrayPayload;
  /** float32 [L, S]: one number per cell when the grid's `cells` is set (scalar cells). */
  values?: ArrayPayload | null;
}

/** How the scalar cells of a grid are coloured (inferno from `low` to `high`). */
export interface CellScale {
  low: number;
  high: number;
  /** What one value means and how the scale was chosen. */
  meaning: string;
}

/** Small multiples: one map per (layer, step[, token]), rows grouped by block. */
export interface GridData {
  source: GridSource;
  groups: GridGroup[];
  /** Loop index of each column. */
  steps: number[];
  /** Token indices held along the maps' T axis (per-token sources); [] otherwise (T = 1). */
  tokens: number[];
  per_token: boolean;
  description: string;
  /** Set when each cell is one number (the groups' `values`), not a map. */
  cells?: CellScale | null;
}

/** What a colour scale means. */
export interface ScaleInfo {
  meaning: string;
  normalisation: string;
}

/** Insertion/deletion curves of one shown map beside the random-order baseline. */
export interface FaithfulnessEntry {
  overlay: OverlayKind;
  step: number;
  token: number | null;
  layer: string;
  head: number;
  operator: string;
  operator_text: string;
  similarity: string;
  /** float32 [S]: share of latent cells perturbed. */
  fractions: ArrayPayload;
  /** float32 [4, S]: map deletion, map insertion, random deletion, random insertion. */
  curves: ArrayPayload;
  deletion_auc: number;
  insertion_auc: number;
  random_deletion_auc: number;
  random_insertion_auc: number;
  random_deletion_sd: number;
  random_insertion_sd: number;
  n_random: number;
  description: string;
}

export interface CurveSeries {
  name: string;
  group: CurveGroup;
  token: number | null;
}

/** Curves over steps; `values` is float32 [series, steps]. */
export interface CurveSet {
  series: CurveSeries[];
  values: ArrayPayload;
}

/** The last prompt switch A -> B: the filmstrip (one seed) and when each attribute committed. */
export interface SwitchFilmstrip {
  word: string;
  replacement: string;
  prompt_b: string;
  /** The seed whose final images these are. */
  seed: number;
  /** Seeds the commitment curves were judged over. */
  n_seeds: number;
  n_steps: number;
  /** Switch step k of each image (k = n_steps: no switch, prompt A's own image). */
  steps: number[];
  /** uint8 [K, h, w, 3]: the final image of each switch step. */
  images: ArrayPayload;
  attributes: string[];
  /** Each attribute's value in prompt A. */
  a_values: string[];
  /** Per attribute: first switch step from which COMMITTED_LEVEL of seeds keep A's value. */
  committed: (number | null)[];
}
"""
