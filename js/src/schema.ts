// Generated from diffwidget/widget/schema.py by schema_ts.py; do not edit.
// Regenerate with `python -m diffwidget.widget.schema_ts`.

export type OverlayKind = "none" | "attention" | "df_rise" | "df_cam" | "occlusion" | "concept";
export const OVERLAY_KINDS: readonly OverlayKind[] = ["none", "attention", "df_rise", "df_cam", "occlusion", "concept"];

export type HeavyOverlay = "df_rise" | "df_cam" | "occlusion";
export const HEAVY_OVERLAYS: readonly HeavyOverlay[] = ["df_rise", "df_cam", "occlusion"];

export type ComputedOverlay = "df_rise" | "df_cam" | "occlusion" | "concept";
export const COMPUTED_OVERLAYS: readonly ComputedOverlay[] = ["df_rise", "df_cam", "occlusion", "concept"];

export type GridSource = "none" | "attention" | "df_rise" | "df_cam" | "occlusion" | "concept" | "patching";
export const GRID_SOURCES: readonly GridSource[] = ["none", "attention", "df_rise", "df_cam", "occlusion", "concept", "patching"];

export type Status = "idle" | "running" | "done" | "cancelled" | "error";
export const STATUSES: readonly Status[] = ["idle", "running", "done", "cancelled", "error"];

export type ImageMode = "x0" | "noisy";
export const IMAGE_MODES: readonly ImageMode[] = ["x0", "noisy"];

export type CurveGroup = "attention_mass" | "token_relevance" | "concept_auc" | "commitment" | "faithfulness";
export const CURVE_GROUPS: readonly CurveGroup[] = ["attention_mass", "token_relevance", "concept_auc", "commitment", "faithfulness"];

export type Dtype = "uint8" | "float32" | "int32";
export const DTYPES: readonly Dtype[] = ["uint8", "float32", "int32"];

export type Transport = "binary" | "base64";
export const TRANSPORTS: readonly Transport[] = ["binary", "base64"];

export type FrontendMessage = "cancel" | "faithfulness" | "decode_step" | "buffers_missing" | "prompt_switch";
export const FRONTEND_MESSAGES: readonly FrontendMessage[] = ["cancel", "faithfulness", "decode_step", "buffers_missing", "prompt_switch"];

/** Human names of the overlays. */
export const OVERLAY_LABELS: Readonly<Record<OverlayKind, string>> = { none: "no overlay", attention: "token cross-attention", df_rise: "DF-RISE", df_cam: "DF-CAM", occlusion: "Occlusion", concept: "concept map" };
/** inferno colour map, evenly spaced stops in [0, 1]. */
export const COLORMAP_NAME = "inferno";
export const COLORMAP_STOPS: readonly (readonly [number, number, number])[] = [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39], [252, 255, 164]];
export const MEAN_OVER_HEADS = -1;
export const CONCEPT_MAX_CHARS = 100;
export const COMMITTED_LEVEL = 0.9;
export const SWITCH_MAX_SEEDS = 8;
export const CURVE_PALETTE: readonly string[] = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
export const CURVE_GROUP_TITLES: Readonly<Record<CurveGroup, string>> = { attention_mass: "Attention mass per token (image → text)", token_relevance: "Token relevance per step (min–max over words)", concept_auc: "Concept ROC-AUC per step", commitment: "Committed: share of seeds keeping A's value when switched at step k", faithfulness: "Faithfulness (insertion / deletion AUC)" };
export const CURVE_GROUP_UNITS: Readonly<Record<CurveGroup, string>> = { attention_mass: "share of attention", token_relevance: "relevance (0–1)", concept_auc: "ROC-AUC", commitment: "share", faithfulness: "AUC" };

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

/** Every synced trait of the explorer widget. */
export interface WidgetState {
  /** Loop index shown (0..n_steps-1), never the timestep. */
  step: number;
  /** Index into `tokens` of the token whose overlay is shown. */
  token: number;
  /** Overlay drawn over the image. */
  overlay: OverlayKind;
  /** Overlay opacity in [0, 1]. */
  opacity: number;
  /** Predicted clean image or noisy x_t. */
  image_mode: ImageMode;
  /** Show start/end/padding token chips. */
  show_special: boolean;
  /** Attention filter: '' (all layers), a grid such as '16x16', or one attn2 layer path. */
  attention_layer: string;
  /** Attention head shown; -1 = mean. */
  attention_head: number;
  /** Layer of a saliency method's per-layer maps shown ('' = the method's combination). */
  saliency_layer: string;
  /** Word (any, in the prompt or not) whose concept map the 'concept' overlay shows; '' = none. */
  concept: string;
  /** Word of the prompt the causal (patching) grid replaces; '' = none. */
  patch_word: string;
  /** Word the causal grid's source prompt has instead of `patch_word`; '' = none. */
  patch_replacement: string;
  /** Source of the layer x step grid ('none' = closed). */
  grid: GridSource;
  /** Prompt word a prompt switch replaces (one of `switch_words`; '' = none chosen). */
  switch_word: string;
  /** The word it is replaced by (any one word, shown only as text). */
  switch_replacement: string;
  /** Seeds a prompt switch is judged over (1..SWITCH_MAX_SEEDS): the trace's seed, then +1… */
  switch_seeds: number;
  /** State of the heavy computation. */
  readonly status: Status;
  /** Progress of the running computation, 0..1. */
  readonly progress: number;
  /** Last rejected input or failed computation; '' if none. */
  readonly error: string;
  /** The traced prompt. */
  readonly prompt: string;
  /** Token strings. */
  readonly tokens: string[];
  /** start / word / end / pad per token. */
  readonly token_kinds: string[];
  /** Scheduler timestep t of each step. */
  readonly timesteps: number[];
  /** The prompt's content words a switch can replace. */
  readonly switch_words: string[];
  /** Overlay kinds that can be shown or computed. */
  readonly available: string[];
  /** Front-end messages the kernel can serve now (e.g. 'faithfulness' needs a pipeline). */
  readonly actions: string[];
  /** How array payloads travel. */
  readonly transport: Transport;
  /** Decoded predicted x0 per step: uint8 [N, H, W, 3]. */
  readonly previews: ArrayPayload | null;
  /** Steps whose x0 preview was replaced by a full VAE decode on request. */
  readonly exact_steps: number[];
  /** Decoded noisy latent x_t per step: uint8 [N, H, W, 3] (sent when first shown). */
  readonly noisy_previews: ArrayPayload | null;
  /** Per-token attention of the default filter, on its own grid (sent at open). */
  readonly attention: AttentionSet | null;
  /** Attention under the current filter when it is not the default (the view keeps each one it received); null under the default. */
  readonly attention_filtered: AttentionSet | null;
  /** Computed overlays per kind: maps uint8 [K, h, w] for the listed steps (the concept map's are of the word in `concept`). */
  readonly overlays: Partial<Record<ComputedOverlay, OverlaySet>>;
  /** Values the layer and head filters accept, with labels. */
  readonly layer_options: LayerOptions;
  /** Maps of the open layer x step grid (fetched when `grid` is set). */
  readonly grid_data: GridData | null;
  /** What the colour scale of each overlay means and how maps were normalised. */
  readonly scales: Partial<Record<OverlayKind, ScaleInfo>>;
  /** Insertion/deletion results computed for shown maps, beside random orders. */
  readonly faithfulness: FaithfulnessEntry[];
  /** Curves over steps: values float32 [K, N] (NaN where not computed). */
  readonly curves: CurveSet | null;
  /** The last prompt switch: the final image of each switch step (one seed) and when each judged attribute committed. */
  readonly switch: SwitchFilmstrip | null;
  /** What each overlay and image mode shows, keyed by overlay kind or image mode. */
  readonly descriptions: Record<string, string>;
}

export const FRONTEND_WRITABLE = ["step", "token", "overlay", "opacity", "image_mode", "show_special", "attention_layer", "attention_head", "saliency_layer", "concept", "patch_word", "patch_replacement", "grid", "switch_word", "switch_replacement", "switch_seeds"] as const;
export type WritableKey = (typeof FRONTEND_WRITABLE)[number];
export const PAYLOAD_TRAITS = ["previews", "noisy_previews", "attention", "attention_filtered", "overlays", "grid_data", "faithfulness", "curves", "switch"] as const;
