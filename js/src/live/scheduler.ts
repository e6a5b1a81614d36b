/**
 * diffusers' DPMSolverMultistepScheduler (DPM-Solver++, first and second order, midpoint),
 * ported for the configurations the embedded model ships: linear or scaled-linear betas,
 * optionally rescaled to zero terminal SNR, "trailing", "linspace" or "leading" timestep
 * spacing, epsilon or v prediction, final sigma zero or sigma_min. Tables are float32 like
 * torch's; the update arithmetic runs in double and is stored as float32 (differences from
 * torch's float32 arithmetic are rounding, a few 1e-7 relative).
 */
import type { SchedulerFacts } from "./manifest";

const f32 = Math.fround;

/** NumPy's round (half to even). */
export function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

function check(config: SchedulerFacts): void {
  const problems: string[] = [];
  if (config.class_name !== "DPMSolverMultistepScheduler") problems.push(config.class_name);
  if (config.algorithm_type !== "dpmsolver++") problems.push(config.algorithm_type);
  if (config.solver_order < 1 || config.solver_order > 2) problems.push("solver_order > 2");
  if (config.solver_type !== "midpoint") problems.push(config.solver_type);
  if (!["epsilon", "v_prediction"].includes(config.prediction_type)) {
    problems.push(config.prediction_type);
  }
  if (!["linear", "scaled_linear"].includes(config.beta_schedule)) {
    problems.push(config.beta_schedule);
  }
  if (problems.length > 0) {
    throw new Error(
      `the browser runtime ports DPM-Solver++ (order ≤ 2, midpoint, epsilon or v prediction, ` +
        `linear betas); this model's scheduler has ${problems.join(", ")}: re-export the model ` +
        "with that scheduler",
    );
  }
}

/** alphas_cumprod of the training schedule, float32 as diffusers stores it. */
export function alphasCumprod(config: SchedulerFacts): Float32Array {
  const n = config.num_train_timesteps;
  const betas = new Float64Array(n);
  const scaled = config.beta_schedule === "scaled_linear";
  const start = scaled ? Math.sqrt(config.beta_start) : config.beta_start;
  const end = scaled ? Math.sqrt(config.beta_end) : config.beta_end;
  for (let i = 0; i < n; i++) {
    const b = f32(start + ((end - start) * i) / (n - 1));
    betas[i] = scaled ? f32(b * b) : b;
  }
  const cumprod = new Float32Array(n);
  let product = 1;
  for (let i = 0; i < n; i++) {
    product *= 1 - betas[i];
    cumprod[i] = product;
  }
  if (config.rescale_betas_zero_snr) {
    // Lin et al. 2023, Algorithm 1, on sqrt(alphas_cumprod).
    const sqrt = Array.from(cumprod, (a) => Math.sqrt(a));
    const first = sqrt[0];
    const last = sqrt[n - 1];
    for (let i = 0; i < n; i++) {
      const s = ((sqrt[i] - last) * first) / (first - last);
      cumprod[i] = s * s;
    }
    // diffusers keeps the last value just above zero so the first sigma is finite.
    cumprod[n - 1] = 2 ** -24;
  }
  return cumprod;
}

/** The timesteps `set_timesteps(steps)` chooses. */
export function timestepsFor(config: SchedulerFacts, steps: number): number[] {
  const n = config.num_train_timesteps;
  if (!Number.isInteger(steps) || steps < 1 || steps > n) {
    throw new Error(`steps must be an integer in 1..${n}, got ${steps}`);
  }
  const out: number[] = [];
  if (config.timestep_spacing === "trailing") {
    const ratio = n / steps;
    for (let i = 0; n - i * ratio > 0; i++) out.push(roundHalfEven(n - i * ratio) - 1);
  } else if (config.timestep_spacing === "linspace") {
    for (let i = steps; i > 0; i--) out.push(roundHalfEven(((n - 1) * i) / steps));
  } else if (config.timestep_spacing === "leading") {
    const ratio = Math.floor(n / (steps + 1));
    for (let i = steps; i > 0; i--) out.push(i * ratio + config.steps_offset);
  } else {
    throw new Error(`timestep_spacing ${config.timestep_spacing} is not supported`);
  }
  return out;
}

interface Coefficients {
  alpha: number;
  sigma: number;
  lambda: number;
}

function coefficients(s: number): Coefficients {
  const alpha = 1 / Math.sqrt(s * s + 1);
  const sigma = s * alpha;
  return { alpha, sigma, lambda: Math.log(alpha) - Math.log(sigma) };
}

/** One denoising run: `step()` once per timestep, in order, as diffusers' scheduler. */
export class DPMSolverMultistep {
  readonly timesteps: number[];
  /** sigma per step, then the final sigma (length steps + 1), float32. */
  readonly sigmas: Float32Array;
  private readonly outputs: (Float32Array | null)[];
  private lowerOrderNums = 0;
  private index = 0;

  constructor(
    readonly config: SchedulerFacts,
    steps: number,
  ) {
    check(config);
    const cumprod = alphasCumprod(config);
    this.timesteps = timestepsFor(config, steps);
    const table = Array.from(cumprod, (a) => f32(Math.sqrt(f32(f32(1 - a) / a))));
    const last =
      config.final_sigmas_type === "zero"
        ? 0
        : f32(Math.sqrt(f32(f32(1 - cumprod[0]) / cumprod[0])));
    this.sigmas = Float32Array.from([...this.timesteps.map((t) => table[t]), last]);
    this.outputs = new Array(config.solver_order).fill(null);
  }

  /** Index of the next step. */
  get stepIndex(): number {
    return this.index;
  }

  /** What the UNet is fed: the integer timesteps themselves. */
  get modelTimesteps(): number[] {
    return this.timesteps;
  }

  /** x = alpha x0 + sigma eps of step `i` (diffwidget's "vp_sigmas" coefficients). */
  alphaSigma(i: number): { alpha: number; sigma: number } {
    const { alpha, sigma } = coefficients(this.sigmas[i]);
    return { alpha, sigma };
  }

  /** The predicted clean sample of this step's model output (no clipping). */
  predictX0(modelOutput: Float32Array, sample: Float32Array, i = this.index): Float32Array {
    const { alpha, sigma } = coefficients(this.sigmas[i]);
    const out = new Float32Array(sample.length);
    const v = this.config.prediction_type === "v_prediction";
    for (let k = 0; k < out.length; k++) {
      out[k] = v
        ? alpha * sample[k] - sigma * modelOutput[k]
        : (sample[k] - sigma * modelOutput[k]) / alpha;
    }
    return out;
  }

  /** Advance one step: the sample at the next timestep. */
  step(modelOutput: Float32Array, sample: Float32Array): Float32Array {
    const n = this.timesteps.length;
    const i = this.index;
    if (i >= n) throw new Error(`the run has ${n} steps; it is over`);
    const c = this.config;
    const lowerOrderFinal =
      i === n - 1 &&
      (c.euler_at_final || (c.lower_order_final && n < 15) || c.final_sigmas_type === "zero");
    const x0 = this.predictX0(modelOutput, sample, i);
    this.outputs.shift();
    this.outputs.push(x0);
    const t = coefficients(this.sigmas[i + 1]);
    const s0 = coefficients(this.sigmas[i]);
    const h = t.lambda - s0.lambda;
    const expm = Math.exp(-h) - 1;
    const out = new Float32Array(sample.length);
    if (c.solver_order === 1 || this.lowerOrderNums < 1 || lowerOrderFinal) {
      const a = t.sigma / s0.sigma;
      const b = t.alpha * expm;
      for (let k = 0; k < out.length; k++) out[k] = a * sample[k] - b * x0[k];
    } else {
      const s1 = coefficients(this.sigmas[i - 1]);
      const r0 = (s0.lambda - s1.lambda) / h;
      const m1 = this.outputs[this.outputs.length - 2] as Float32Array;
      const a = t.sigma / s0.sigma;
      const b = t.alpha * expm;
      for (let k = 0; k < out.length; k++) {
        const d1 = (x0[k] - m1[k]) / r0;
        out[k] = a * sample[k] - b * x0[k] - 0.5 * b * d1;
      }
    }
    if (this.lowerOrderNums < c.solver_order) this.lowerOrderNums += 1;
    this.index += 1;
    return out;
  }
}
