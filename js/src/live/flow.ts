/**
 * diffusers' FlowMatchEulerDiscreteScheduler, ported for the configuration the embedded DiT
 * ships: a static `shift` (no dynamic, Karras, exponential or beta sigmas, no terminal
 * stretch, not inverted, not stochastic). Sigmas are made in double as NumPy makes them and
 * stored float32 as torch does; each step is torch's float32 `sample + dt * v`. The model
 * predicts a velocity v = eps - x0, so x̂0 = x_t - sigma v (diffwidget/tracing/noise.py
 * predict_x0, "flow_prediction").
 */
import type { FlowMatchFacts } from "./manifest";
import { roundHalfEven } from "./scheduler";

const f32 = Math.fround;

function check(config: FlowMatchFacts): void {
  const unported = (
    [
      "use_dynamic_shifting",
      "invert_sigmas",
      "use_karras_sigmas",
      "use_exponential_sigmas",
      "use_beta_sigmas",
      "stochastic_sampling",
    ] as const
  ).filter((key) => config[key]);
  if (config.shift_terminal) unported.push("shift_terminal" as (typeof unported)[number]);
  if (!(config.shift > 0)) unported.push("shift" as (typeof unported)[number]);
  if (unported.length > 0) {
    throw new Error(
      "the browser runtime ports flow-matching Euler with a static shift; this model's " +
        `scheduler uses ${unported.join(", ")}: re-export the model without it`,
    );
  }
}

/** `shift * s / (1 + (shift - 1) * s)` (the resolution shift; identity for shift 1). */
function shifted(shift: number, s: number): number {
  return (shift * s) / (1 + (shift - 1) * s);
}

/** NumPy's `linspace(start, stop, num)` (the last value is `stop` exactly). */
export function linspace(start: number, stop: number, num: number): number[] {
  if (num === 1) return [start];
  const step = (stop - start) / (num - 1);
  const out = Array.from({ length: num }, (_, i) => i * step + start);
  out[num - 1] = stop;
  return out;
}

/** The float32 sigmas `set_timesteps(steps)` makes, then the final 0 (length steps + 1). */
export function flowSigmas(config: FlowMatchFacts, steps: number): Float32Array {
  const n = config.num_train_timesteps;
  if (!Number.isInteger(steps) || steps < 1 || steps > n) {
    throw new Error(`steps must be an integer in 1..${n}, got ${steps}`);
  }
  // The training table's ends (float32 in __init__): t = n ... 1, sigma = shifted(t / n).
  const shift = f32(config.shift);
  const end = (t: number): number =>
    f32(f32(shift * f32(t / n)) / f32(1 + f32((shift - 1) * f32(t / n))));
  const sigmaMax = end(n);
  const sigmaMin = end(1);
  const timesteps = linspace(sigmaMax * n, sigmaMin * n, steps);
  const sigmas = timesteps.map((t) => f32(shifted(config.shift, t / n)));
  return Float32Array.from([...sigmas, 0]);
}

/** One denoising run: `step()` once per timestep, in order, as diffusers' scheduler. */
export class FlowMatchEuler {
  /** sigma per step, then 0 (length steps + 1), float32. */
  readonly sigmas: Float32Array;
  /** What the transformer is fed: sigma * num_train_timesteps in float32. */
  readonly modelTimesteps: number[];
  /** The timesteps a trace stores (rounded half to even). */
  readonly timesteps: number[];
  private index = 0;

  constructor(
    readonly config: FlowMatchFacts,
    steps: number,
  ) {
    check(config);
    this.sigmas = flowSigmas(config, steps);
    this.modelTimesteps = Array.from(this.sigmas.subarray(0, steps), (s) =>
      f32(s * config.num_train_timesteps),
    );
    this.timesteps = this.modelTimesteps.map(roundHalfEven);
  }

  /** Index of the next step. */
  get stepIndex(): number {
    return this.index;
  }

  /** The predicted clean sample x̂0 = x_t - sigma v of step `i`. */
  predictX0(modelOutput: Float32Array, sample: Float32Array, i = this.index): Float32Array {
    const sigma = this.sigmas[i];
    const out = new Float32Array(sample.length);
    for (let k = 0; k < out.length; k++) out[k] = sample[k] - f32(sigma * modelOutput[k]);
    return out;
  }

  /** Advance one step: x_next = x + (sigma_next - sigma) v, in float32 as torch. */
  step(modelOutput: Float32Array, sample: Float32Array): Float32Array {
    const n = this.timesteps.length;
    const i = this.index;
    if (i >= n) throw new Error(`the run has ${n} steps; it is over`);
    const dt = f32(this.sigmas[i + 1] - this.sigmas[i]);
    const out = new Float32Array(sample.length);
    for (let k = 0; k < out.length; k++) out[k] = sample[k] + f32(dt * modelOutput[k]);
    this.index += 1;
    return out;
  }
}
