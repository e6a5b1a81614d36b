/**
 * The page's first caption generated ahead, when the page was written (FirstRun in
 * diffwidget/tracing/live_run.py): the arrays of a LiveRun for the default seed, steps and
 * guidance, which the explorer draws while onnxruntime-web compiles and creates its sessions.
 * Everything is checked against the manifest before an array is made from it.
 */
import { decodeBase64, gunzip } from "./assets";
import type { LiveManifest } from "./manifest";
import { torchRandn } from "./noise";
import { type LiveRun, type TailToken, textPositions } from "./runtime";
import { makeSampler } from "./sampler";
import { WordTokenizer } from "./tokenizer";

/** One array (ArrayPayload in live_run.py): base64 of gzip of its little-endian values. */
export interface FirstArray {
  encoding: "float16" | "uint8";
  shape: number[];
  /** Each byte stands for byte * scale. */
  scale: number;
  /** Rows after the first hold their difference from the row before, modulo 256. */
  delta: boolean;
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
  noise_pred: FirstArray;
  previews: FirstArray;
  attention: Record<string, FirstArray>;
  image: FirstArray;
}

/** IEEE half-precision bits as a number. */
export function halfToFloat(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);
  if (exponent === 0x1f) return fraction ? Number.NaN : sign * Number.POSITIVE_INFINITY;
  return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
}

/** The rows of one array, checked against the shape the manifest implies. */
async function rows(
  a: FirstArray | undefined,
  encoding: FirstArray["encoding"],
  steps: number,
  width: number,
): Promise<Uint8Array[] | Float32Array[]> {
  if (
    a?.encoding !== encoding ||
    !Array.isArray(a.shape) ||
    a.shape[0] !== steps ||
    a.shape[1] !== width ||
    typeof a.data !== "string" ||
    !(Number.isFinite(a.scale) && a.scale > 0)
  ) {
    throw new Error(`an array of the precomputed run is not [${steps}, ${width}] ${encoding}`);
  }
  const bytes = await gunzip(decodeBase64(a.data));
  const size = encoding === "float16" ? 2 : 1;
  if (bytes.length !== steps * width * size) {
    throw new Error("an array of the precomputed run has the wrong number of bytes");
  }
  if (encoding === "float16") {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    return Array.from({ length: steps }, (_, s) =>
      Float32Array.from({ length: width }, (_, k) =>
        halfToFloat(view.getUint16(2 * (s * width + k), true)),
      ),
    );
  }
  const out: Uint8Array[] = [];
  for (let s = 0; s < steps; s++) {
    const row = bytes.slice(s * width, (s + 1) * width);
    if (a.delta && s > 0) for (let k = 0; k < width; k++) row[k] = (row[k] + out[s - 1][k]) & 0xff;
    out.push(row);
  }
  return out;
}

function scaled(bytes: Uint8Array[], scale: number): Float32Array[] {
  return bytes.map((row) => Float32Array.from(row, (b) => b * scale));
}

/** The precomputed run as the runtime's LiveRun (latents and x̂0 replayed from the noise). */
export async function runFromFirst(
  first: FirstRunPayload,
  manifest: LiveManifest,
  tail: TailToken,
): Promise<LiveRun> {
  const { steps } = first;
  if (first.model !== manifest.model || !Number.isInteger(steps) || steps < 1) {
    throw new Error("the precomputed run is of another model");
  }
  const tokenizer = new WordTokenizer(manifest.tokenizer);
  const { tokens, selected } = textPositions(tokenizer, manifest.text_tail, tail, first.prompt);
  if (selected.join() !== (first.selected ?? []).join()) {
    throw new Error("the precomputed run kept other text positions than this page does");
  }
  const [h, w] = manifest.latent_hw;
  const [H, W] = manifest.image_hw;
  const size = manifest.latent_channels * h * w;
  const noisePred = (await rows(first.noise_pred, "float16", steps, size)) as Float32Array[];
  // The page's own seeded noise and sampler give the latents and x̂0 from the noise.
  const sampler = makeSampler(manifest.scheduler, steps);
  if (sampler.timesteps.join() !== (first.timesteps ?? []).join()) {
    throw new Error("the precomputed run's timesteps are not this page's");
  }
  const latents: Float32Array[] = [];
  const predX0: Float32Array[] = [];
  let latent = torchRandn(size, first.seed);
  for (let i = 0; i < steps; i++) {
    latents.push(latent);
    predX0.push(sampler.predictX0(noisePred[i], latent, i));
    latent = sampler.step(noisePred[i], latent);
  }
  const attention = new Map<string, Float32Array[]>();
  for (const a of manifest.attention) {
    const cells = a.grid[0] * a.grid[1] * selected.length;
    const data = first.attention?.[a.layer];
    const bytes = (await rows(data, "uint8", steps, cells)) as Uint8Array[];
    attention.set(a.layer, scaled(bytes, data?.scale ?? 1));
  }
  const pixels = H * W * 3;
  return {
    request: { prompt: first.prompt, seed: first.seed, steps, guidance: first.guidance },
    tokens,
    selected,
    timesteps: sampler.timesteps,
    latents,
    noisePred,
    predX0,
    previews: (await rows(first.previews, "uint8", steps, pixels)) as Uint8Array[],
    attention,
    image: ((await rows(first.image, "uint8", 1, pixels)) as Uint8Array[])[0],
    warning: tokenizer.warning(first.prompt),
    millis: 0,
  };
}
