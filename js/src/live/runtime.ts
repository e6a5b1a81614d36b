/**
 * One generation in the page: tokenizer, seeded noise, the manifest's sampler (DPM-Solver++
 * for the UNet, flow-matching Euler for the DiT) with classifier-free guidance, x̂0 previews
 * and per-token image→text attention per step, the VAE decode; the four exported graphs run
 * in onnxruntime-web's single-thread WebAssembly build (no worker, no cross-origin
 * isolation, nothing fetched: the graphs and the .wasm binary are handed in).
 */
import * as ort from "onnxruntime-web/wasm";
import { DENOISER_GRAPH, type GraphName, type LiveManifest, modelGraphs } from "./manifest";
import { torchRandn } from "./noise";
import { makeSampler } from "./sampler";
import { defaultSelection, type Tokenized, type TokenKind, WordTokenizer } from "./tokenizer";

/** What the runtime is given: the manifest, each graph's bytes and onnxruntime's .wasm. */
export interface LiveAssets {
  manifest: LiveManifest;
  graphs: Partial<Record<GraphName, Uint8Array>>;
  wasm: ArrayBuffer;
}

/** How the page shows the all-zero text positions after the tokenizer's (the DiT's T5). */
export interface TailToken {
  string: string;
  kind: TokenKind;
}

export interface GenerateRequest {
  prompt: string;
  seed: number;
  steps: number;
  guidance: number;
}

/** Everything one generation produced, arrays per step (the shape of a Python Trace). */
export interface LiveRun {
  request: GenerateRequest;
  /** Every text position the denoiser reads (the tokenizer's, then the tail's). */
  tokens: Tokenized;
  /** Token positions kept (start, words, end, first padding, first tail position), as a
   * trace keeps by default. */
  selected: number[];
  timesteps: number[];
  /** [steps][C * h * w] */
  latents: Float32Array[];
  noisePred: Float32Array[];
  predX0: Float32Array[];
  /** [steps][H * W * 3] uint8 */
  previews: Uint8Array[];
  /** layer -> [steps][h * w * selected] (conditional half, mean over heads) */
  attention: Map<string, Float32Array[]>;
  image: Uint8Array;
  warning: string;
  /** Milliseconds of the generation (tokenizer to final decode). */
  millis: number;
}

/** Progress callback: the step just finished (0-based) and the run so far. */
export type OnStep = (step: number, run: LiveRun) => void;

let configured = false;

function configure(wasm: ArrayBuffer): void {
  if (configured) return;
  // One thread: threads need cross-origin isolation (COOP/COEP), which notebooks lack.
  ort.env.wasm.numThreads = 1;
  ort.env.wasm.proxy = false;
  ort.env.wasm.wasmBinary = wasm;
  ort.env.logLevel = "error";
  configured = true;
}

export class LiveModel {
  readonly tokenizer: WordTokenizer;

  private constructor(
    readonly manifest: LiveManifest,
    private readonly sessions: Partial<Record<GraphName, ort.InferenceSession>>,
    readonly tail: TailToken,
  ) {
    this.tokenizer = new WordTokenizer(manifest.tokenizer);
  }

  /** Compile the WebAssembly module and create one session per graph. */
  static async create(
    assets: LiveAssets,
    tail: TailToken,
    level: ort.InferenceSession.SessionOptions["graphOptimizationLevel"] = "all",
  ): Promise<LiveModel> {
    configure(assets.wasm);
    const options: ort.InferenceSession.SessionOptions = {
      executionProviders: ["wasm"],
      graphOptimizationLevel: level,
    };
    const entries = await Promise.all(
      modelGraphs(assets.manifest.model).map(async (name) => {
        const bytes = assets.graphs[name];
        if (!bytes) throw new Error(`the ${name} graph was not loaded`);
        return [name, await ort.InferenceSession.create(bytes, options)] as const;
      }),
    );
    return new LiveModel(assets.manifest, Object.fromEntries(entries), tail);
  }

  private async run(
    name: GraphName,
    feeds: Record<string, ort.Tensor>,
  ): Promise<ort.InferenceSession.ReturnType> {
    const session = this.sessions[name];
    if (!session) throw new Error(`the ${name} graph was not loaded`);
    return session.run(feeds);
  }

  /** Check a request against what the model supports; returns a message or "". */
  problem(request: GenerateRequest): string {
    const { seed, steps, guidance } = request;
    if (!Number.isSafeInteger(seed) || seed < 0 || seed >= 2 ** 32) {
      return "the seed must be a whole number from 0 to 4294967295";
    }
    if (!Number.isInteger(steps) || steps < 1 || steps > this.manifest.max_steps) {
      return `the number of steps must be a whole number from 1 to ${this.manifest.max_steps}`;
    }
    if (!Number.isFinite(guidance) || guidance <= 1) {
      return "the guidance scale must be above 1 (classifier-free guidance)";
    }
    return "";
  }

  /** Generate one image, calling `onStep` after each denoising step. */
  async generate(request: GenerateRequest, onStep?: OnStep): Promise<LiveRun> {
    const problem = this.problem(request);
    if (problem) throw new Error(problem);
    const start = performance.now();
    const m = this.manifest;
    const [h, w] = m.latent_hw;
    const c = m.latent_channels;
    const size = c * h * w;
    const { tokens, selected } = textPositions(
      this.tokenizer,
      m.text_tail,
      this.tail,
      request.prompt,
    );
    const empty = this.tokenizer.encode("");
    const length = m.tokenizer.max_length;
    const clipIds = [...empty.ids, ...tokens.ids.slice(0, length)];
    const ids = BigInt64Array.from(clipIds.map((i) => BigInt(i)));
    // Every output of the text graph (text; pooled for the DiT) is a denoiser input.
    const text = (await this.run("text_encoder", {
      input_ids: new ort.Tensor("int64", ids, [2, length]),
    })) as Record<string, ort.Tensor>;
    const denoiser = DENOISER_GRAPH[m.model];
    const width = m.tokenizer.max_length + m.text_tail;
    const scheduler = makeSampler(m.scheduler, request.steps);
    const run: LiveRun = {
      request,
      tokens,
      selected,
      timesteps: scheduler.timesteps,
      latents: [],
      noisePred: [],
      predX0: [],
      previews: [],
      attention: new Map(m.attention.map((a) => [a.layer, []])),
      image: new Uint8Array(0),
      warning: this.tokenizer.warning(request.prompt),
      millis: 0,
    };
    let latent = torchRandn(size, request.seed);
    const both = new Float32Array(2 * size);
    for (let i = 0; i < scheduler.timesteps.length; i++) {
      both.set(latent, 0);
      both.set(latent, size);
      const out = await this.run(denoiser, {
        ...text,
        sample: new ort.Tensor("float32", both, [2, c, h, w]),
        timestep: new ort.Tensor("float32", Float32Array.of(scheduler.modelTimesteps[i]), [1]),
      });
      const output = (out.model_output as ort.Tensor).data as Float32Array;
      const guided = new Float32Array(size);
      const g = request.guidance;
      for (let k = 0; k < size; k++) {
        const u = output[k];
        guided[k] = u + g * (output[size + k] - u);
      }
      for (const a of m.attention) {
        const probs = (out[a.output] as ort.Tensor).data as Float32Array;
        run.attention.get(a.layer)?.push(selectColumns(probs, width, selected));
      }
      const x0 = scheduler.predictX0(guided, latent, i);
      const preview = await this.run("preview", {
        latent: new ort.Tensor("float32", x0, [1, c, h, w]),
      });
      run.latents.push(latent);
      run.noisePred.push(guided);
      run.predX0.push(x0);
      run.previews.push((preview.image as ort.Tensor).data as Uint8Array);
      latent = scheduler.step(guided, latent);
      onStep?.(i, run);
    }
    const decoded = await this.run("vae", {
      latent: new ort.Tensor("float32", latent, [1, c, h, w]),
    });
    run.image = (decoded.image as ort.Tensor).data as Uint8Array;
    run.millis = performance.now() - start;
    return run;
  }
}

/** The caption's tokens over every text position, and those a trace keeps by default. */
export function textPositions(
  tokenizer: WordTokenizer,
  tailLength: number,
  tail: TailToken,
  prompt: string,
): { tokens: Tokenized; selected: number[] } {
  const clip = tokenizer.encode(prompt);
  const selected = defaultSelection(clip.kinds);
  if (tailLength === 0) return { tokens: clip, selected };
  // A trace keeps the first of the identical tail positions (tracing/tokens.py).
  return {
    tokens: {
      ids: [...clip.ids, ...new Array<number>(tailLength).fill(-1)],
      strings: [...clip.strings, ...new Array<string>(tailLength).fill(tail.string)],
      kinds: [...clip.kinds, ...new Array<TokenKind>(tailLength).fill(tail.kind)],
    },
    selected: [...selected, clip.ids.length],
  };
}

/** Columns `keep` of a row-major [rows, width] matrix. */
export function selectColumns(values: Float32Array, width: number, keep: number[]): Float32Array {
  const rows = values.length / width;
  const out = new Float32Array(rows * keep.length);
  for (let r = 0; r < rows; r++) {
    for (let j = 0; j < keep.length; j++) out[r * keep.length + j] = values[r * width + keep[j]];
  }
  return out;
}
