// Generated from diffwidget/widget/schema.py; do not edit.
// Regenerate with `python -m diffwidget.widget.schema`.

export type OverlayKind = "none" | "attention" | "df_rise" | "df_cam";
export const OVERLAY_KINDS: readonly OverlayKind[] = ["none", "attention", "df_rise", "df_cam"];

export type HeavyOverlay = "df_rise" | "df_cam";
export const HEAVY_OVERLAYS: readonly HeavyOverlay[] = ["df_rise", "df_cam"];

export type Status = "idle" | "running" | "done" | "cancelled" | "error";
export const STATUSES: readonly Status[] = ["idle", "running", "done", "cancelled", "error"];

export type ImageMode = "x0" | "noisy";
export const IMAGE_MODES: readonly ImageMode[] = ["x0", "noisy"];

export type CurveGroup = "attention_mass" | "token_relevance" | "concept_auc" | "faithfulness";
export const CURVE_GROUPS: readonly CurveGroup[] = ["attention_mass", "token_relevance", "concept_auc", "faithfulness"];

export type Dtype = "uint8" | "float32" | "int32";
export const DTYPES: readonly Dtype[] = ["uint8", "float32", "int32"];

export type FrontendMessage = "cancel";
export const FRONTEND_MESSAGES: readonly FrontendMessage[] = ["cancel"];

/** An n-d array sent as one binary buffer; `scale` dequantises uint8 data. */
export interface ArrayPayload {
  dtype: Dtype;
  shape: number[];
  data: DataView;
  /** value = q / 255 * scale, one scale per leading index (e.g. [N, T]). */
  scale?: ArrayPayload;
}

/** Heavy overlay maps for the steps computed so far. */
export interface OverlaySet {
  steps: number[];
  maps: ArrayPayload;
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
  /** Overlay kinds that can be shown or computed. */
  readonly available: string[];
  /** Decoded predicted x0 per step: uint8 [N, H, W, 3]. */
  readonly previews: ArrayPayload | null;
  /** Decoded noisy latent x_t per step: uint8 [N, H, W, 3]. */
  readonly noisy_previews: ArrayPayload | null;
  /** Per-token attention maps uint8 [N, T, h, w]; value = q / 255 * scale[N, T]. */
  readonly attention: ArrayPayload | null;
  /** Computed heavy overlays per kind: maps uint8 [K, h, w] for the listed steps. */
  readonly overlays: Partial<Record<HeavyOverlay, OverlaySet>>;
  /** Curves over steps: values float32 [K, N] (NaN where not computed). */
  readonly curves: CurveSet | null;
  /** What each overlay and image mode shows, keyed by overlay kind or image mode. */
  readonly descriptions: Record<string, string>;
}

export const FRONTEND_WRITABLE = ["step", "token", "overlay", "opacity", "image_mode", "show_special"] as const;
export type WritableKey = (typeof FRONTEND_WRITABLE)[number];
