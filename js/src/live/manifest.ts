/**
 * The live manifest (diffwidget/models/live_manifest.py writes it): what the runtime reads
 * about the exported graphs. It arrives as data, so it is checked before anything is
 * allocated from it.
 */

export const LIVE_FORMAT = 1;
export const GRAPH_NAMES = ["text_encoder", "unet", "transformer", "preview", "vae"] as const;
export type GraphName = (typeof GRAPH_NAMES)[number];
/** The denoiser graph of each exported model (live_manifest.py DENOISER_GRAPH). */
export const DENOISER_GRAPH = { unet: "unet", dit: "transformer" } as const;
export type LiveModelName = keyof typeof DENOISER_GRAPH;
export const DPM_SOLVER = "DPMSolverMultistepScheduler";
export const FLOW_MATCH_EULER = "FlowMatchEulerDiscreteScheduler";

/** The graphs a model's export holds. */
export function modelGraphs(model: LiveModelName): GraphName[] {
  return ["text_encoder", DENOISER_GRAPH[model], "preview", "vae"];
}

export interface GraphFile {
  name: GraphName;
  file: string;
  sha256: string;
  bytes: number;
  inputs: string[];
  outputs: string[];
}

export interface AttentionOutput {
  layer: string;
  grid: [number, number];
  output: string;
}

export interface TokenizerFacts {
  vocab: Record<string, number>;
  merges: string[];
  bos_id: number;
  eos_id: number;
  pad_id: number;
  unk_id: number;
  max_length: number;
  word_end: string;
  spellings: Record<string, string>;
  known_words: string[];
  max_words: number;
  unknown_words_template: string;
  too_long_template: string;
}

export interface SchedulerFacts {
  class_name: typeof DPM_SOLVER;
  num_train_timesteps: number;
  beta_start: number;
  beta_end: number;
  beta_schedule: string;
  rescale_betas_zero_snr: boolean;
  timestep_spacing: string;
  steps_offset: number;
  prediction_type: string;
  algorithm_type: string;
  solver_order: number;
  solver_type: string;
  lower_order_final: boolean;
  euler_at_final: boolean;
  final_sigmas_type: string;
}

/** FlowMatchEulerDiscreteScheduler's config (the DiT's). */
export interface FlowMatchFacts {
  class_name: typeof FLOW_MATCH_EULER;
  num_train_timesteps: number;
  shift: number;
  use_dynamic_shifting: boolean;
  invert_sigmas: boolean;
  shift_terminal: number | null;
  use_karras_sigmas: boolean;
  use_exponential_sigmas: boolean;
  use_beta_sigmas: boolean;
  stochastic_sampling: boolean;
}

export interface LiveManifest {
  format_version: number;
  model: LiveModelName;
  graphs: GraphFile[];
  attention: AttentionOutput[];
  latent_channels: number;
  latent_hw: [number, number];
  image_hw: [number, number];
  cfg_halves: string[];
  scheduler: SchedulerFacts | FlowMatchFacts;
  tokenizer: TokenizerFacts;
  /** All-zero text positions after the tokenizer's (the DiT's absent T5; 0 for the UNet). */
  text_tail: number;
  /** "text_softmax" (cross-attention) or "joint_share" (MMDiT joint attention). */
  attention_normalisation: string;
  default_steps: number;
  default_guidance: number;
  max_steps: number;
  preview_decoder: string;
  fingerprint: string;
  opset: number;
  versions: Record<string, string>;
}

/** Largest grid side or sequence length the page accepts from a manifest. */
const MAX_SIDE = 4096;

function fail(what: string): never {
  throw new Error(`invalid live manifest: ${what}`);
}

function int(value: unknown, what: string, low = 0, high = Number.MAX_SAFE_INTEGER): number {
  if (typeof value !== "number" || !Number.isInteger(value) || value < low || value > high) {
    fail(`${what} must be an integer in ${low}..${high}`);
  }
  return value;
}

function str(value: unknown, what: string): string {
  if (typeof value !== "string") fail(`${what} must be a string`);
  return value;
}

function pair(value: unknown, what: string): [number, number] {
  if (!Array.isArray(value) || value.length !== 2) fail(`${what} must be a pair`);
  return [int(value[0], what, 1, MAX_SIDE), int(value[1], what, 1, MAX_SIDE)];
}

/** Check a decoded manifest; throws with the first field that is wrong. */
export function checkManifest(data: unknown): LiveManifest {
  if (typeof data !== "object" || data === null) fail("not an object");
  const m = data as LiveManifest;
  if (m.format_version !== LIVE_FORMAT) fail(`format_version is not ${LIVE_FORMAT}`);
  if (!Object.hasOwn(DENOISER_GRAPH, str(m.model, "model"))) fail("model");
  if (!Array.isArray(m.graphs)) fail("graphs must be a list");
  for (const name of modelGraphs(m.model)) {
    const graph = m.graphs.find((g) => g.name === name);
    if (!graph) fail(`graph ${name} is missing`);
    if (!/^[\w-]+\.onnx$/.test(str(graph.file, "graph file"))) fail("graph file name");
    if (!/^[0-9a-f]{64}$/.test(str(graph.sha256, "sha256"))) fail("sha256");
    int(graph.bytes, "graph bytes", 1);
  }
  pair(m.latent_hw, "latent_hw");
  pair(m.image_hw, "image_hw");
  int(m.latent_channels, "latent_channels", 1, 64);
  const denoiser = m.graphs.find((g) => g.name === DENOISER_GRAPH[m.model]) as GraphFile;
  if (!Array.isArray(m.attention)) fail("attention must be a list");
  for (const a of m.attention) {
    pair(a.grid, "attention grid");
    if (!denoiser.outputs.includes(str(a.output, "attention output"))) fail("attention output");
  }
  int(m.text_tail, "text_tail", 0, MAX_SIDE);
  str(m.attention_normalisation, "attention_normalisation");
  if (typeof m.scheduler !== "object" || m.scheduler === null) fail("scheduler");
  const scheduler = str(m.scheduler.class_name, "scheduler class_name");
  if (scheduler !== DPM_SOLVER && scheduler !== FLOW_MATCH_EULER) fail("scheduler class_name");
  const t = m.tokenizer;
  if (typeof t !== "object" || t === null) fail("tokenizer");
  int(t.max_length, "max_length", 2, MAX_SIDE);
  for (const key of ["bos_id", "eos_id", "pad_id", "unk_id"] as const) int(t[key], key);
  if (!Array.isArray(t.merges) || !Array.isArray(t.known_words)) fail("merges / known_words");
  if (typeof t.vocab !== "object" || t.vocab === null) fail("vocab");
  for (const id of Object.values(t.vocab)) int(id, "vocab id");
  str(t.unknown_words_template, "unknown_words_template");
  int(m.default_steps, "default_steps", 1, m.max_steps);
  int(m.max_steps, "max_steps", 1, 1000);
  if (typeof m.default_guidance !== "number") fail("default_guidance");
  return m;
}
