/** The sampler a manifest's scheduler names: DPM-Solver++ (UNet) or flow-matching Euler (DiT). */
import { FlowMatchEuler } from "./flow";
import { FLOW_MATCH_EULER, type FlowMatchFacts, type SchedulerFacts } from "./manifest";
import { DPMSolverMultistep } from "./scheduler";

export interface Sampler {
  /** The timesteps a trace stores (integers). */
  readonly timesteps: number[];
  /** What the denoiser is fed at each step. */
  readonly modelTimesteps: number[];
  /** The predicted clean latent of step `i` from the (guided) model output. */
  predictX0(modelOutput: Float32Array, sample: Float32Array, i: number): Float32Array;
  /** Advance one step: the sample at the next timestep. */
  step(modelOutput: Float32Array, sample: Float32Array): Float32Array;
}

/** A fresh run of `steps` steps with the manifest's scheduler. */
export function makeSampler(config: SchedulerFacts | FlowMatchFacts, steps: number): Sampler {
  return config.class_name === FLOW_MATCH_EULER
    ? new FlowMatchEuler(config, steps)
    : new DPMSolverMultistep(config, steps);
}
