/**
 * The page's first caption generated ahead, when the page was written (FirstRun in
 * diffwidget/tracing/live_run.py): the arrays of a LiveRun for the default seed, steps and
 * guidance, which the explorer draws while onnxruntime-web compiles and creates its sessions.
 * Everything is checked against the manifest before an array is made from it.
 */
import { decodeBase64 } from "./assets";
import type { LiveManifest } from "./manifest";
import { type LiveRun, type TailToken, textPositions } from "./runtime";
import { WordTokenizer } from "./tokenizer";

/** One array: little-endian bytes in base64 and its shape (ArrayPayload in live_run.py). */
export interface FirstArray {
  dtype: "float32" | "uint8";
  shape: number[];
  data: string;
}

export interface FirstRunPayload {
  model: string;
  prompt: string;
  seed: number;
  steps: number;
  guidance: number;
  selected: number[];
  timesteps: number[];
  latents: FirstArray;
  noise_pred: FirstArray;
  pred_x0: FirstArray;
  previews: FirstArray;
  attention: Record<string, FirstArray>;
  image: FirstArray;
}

function rows(a: FirstArray, dtype: FirstArray["dtype"], steps: number, width: number) {
  if (
    a?.dtype !== dtype ||
    !Array.isArray(a.shape) ||
    a.shape.length !== 2 ||
    a.shape[0] !== steps ||
    a.shape[1] !== width ||
    typeof a.data !== "string"
  ) {
    throw new Error(`an array of the precomputed run is not [${steps}, ${width}] ${dtype}`);
  }
  const bytes = decodeBase64(a.data);
  const size = dtype === "float32" ? 4 : 1;
  if (bytes.length !== steps * width * size) {
    throw new Error("an array of the precomputed run has the wrong number of bytes");
  }
  const out: (Float32Array | Uint8Array)[] = [];
  for (let i = 0; i < steps; i++) {
    const part = bytes.slice(i * width * size, (i + 1) * width * size);
    // Float32Array reads the platform's order; every browser that runs WebAssembly is LE.
    out.push(dtype === "float32" ? new Float32Array(part.buffer) : part);
  }
  return out;
}

/** The precomputed run as the runtime's LiveRun, or an error saying what does not fit. */
export function runFromFirst(
  first: FirstRunPayload,
  manifest: LiveManifest,
  tail: TailToken,
): LiveRun {
  const { steps } = first;
  if (first.model !== manifest.model || !Number.isInteger(steps) || steps < 1) {
    throw new Error("the precomputed run is of another model");
  }
  const tokenizer = new WordTokenizer(manifest.tokenizer);
  const { tokens, selected } = textPositions(tokenizer, manifest.text_tail, tail, first.prompt);
  if (selected.join() !== (first.selected ?? []).join()) {
    throw new Error("the precomputed run kept other text positions than this page does");
  }
  if (!Array.isArray(first.timesteps) || first.timesteps.length !== steps) {
    throw new Error("the precomputed run's timesteps do not match its steps");
  }
  const [h, w] = manifest.latent_hw;
  const [H, W] = manifest.image_hw;
  const latent = manifest.latent_channels * h * w;
  const attention = new Map<string, Float32Array[]>();
  for (const a of manifest.attention) {
    const cells = a.grid[0] * a.grid[1] * selected.length;
    attention.set(
      a.layer,
      rows(first.attention?.[a.layer], "float32", steps, cells) as Float32Array[],
    );
  }
  return {
    request: { prompt: first.prompt, seed: first.seed, steps, guidance: first.guidance },
    tokens,
    selected,
    timesteps: first.timesteps.map(Number),
    latents: rows(first.latents, "float32", steps, latent) as Float32Array[],
    noisePred: rows(first.noise_pred, "float32", steps, latent) as Float32Array[],
    predX0: rows(first.pred_x0, "float32", steps, latent) as Float32Array[],
    previews: rows(first.previews, "uint8", steps, H * W * 3) as Uint8Array[],
    attention,
    image: rows(
      { ...first.image, shape: [1, first.image?.shape?.[0]] },
      "uint8",
      1,
      H * W * 3,
    )[0] as Uint8Array,
    warning: tokenizer.warning(first.prompt),
    millis: 0,
  };
}
