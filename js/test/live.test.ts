import { describe, expect, it } from "vitest";
import ditManifestJson from "../../diffwidget/models/live/dit/manifest.json";
import manifestJson from "../../diffwidget/models/live/unet/manifest.json";
import { FlowMatchEuler, linspace } from "../src/live/flow";
import {
  checkManifest,
  type FlowMatchFacts,
  type LiveManifest,
  type SchedulerFacts,
} from "../src/live/manifest";
import { torchRandn } from "../src/live/noise";
import { makeSampler } from "../src/live/sampler";
import { DPMSolverMultistep, roundHalfEven, timestepsFor } from "../src/live/scheduler";
import { defaultSelection, normaliseCaption, WordTokenizer } from "../src/live/tokenizer";
import goldenJson from "./fixtures/live_golden.json";

interface TokenCase {
  text: string;
  normalised: string;
  ids: number[];
  strings: string[];
  kinds: string[];
  selected: number[];
  unknown: string[];
  warning: string;
}
interface NoiseCase {
  seed: number;
  n: number;
  values: number[];
}
interface SchedulerCase {
  steps: number;
  timesteps: number[];
  sigmas: number[];
  start: number[];
  model_outputs: number[][];
  samples: number[][];
}
interface FlowCase {
  shift: number;
  steps: number;
  model_timesteps: number[];
  sigmas: number[];
  start: number[];
  model_outputs: number[][];
  x0: number[][];
  samples: number[][];
}
interface Golden {
  tokenizer: TokenCase[];
  noise: NoiseCase[];
  scheduler: SchedulerCase[];
  flow_scheduler: FlowCase[];
}

const golden = goldenJson as unknown as Golden;
const manifest: LiveManifest = checkManifest(manifestJson);
const dpm = manifest.scheduler as SchedulerFacts;
const ditManifest: LiveManifest = checkManifest(ditManifestJson);
const flow = ditManifest.scheduler as FlowMatchFacts;

/** Largest |a - b| / max(1, |b|). */
function maxRelative(a: ArrayLike<number>, b: ArrayLike<number>): number {
  expect(a.length).toBe(b.length);
  let worst = 0;
  for (let i = 0; i < a.length; i++) {
    worst = Math.max(worst, Math.abs(a[i] - b[i]) / Math.max(1, Math.abs(b[i])));
  }
  return worst;
}

describe("tokenizer (golden values from the Python tokenizer)", () => {
  const tokenizer = new WordTokenizer(manifest.tokenizer);
  for (const c of golden.tokenizer) {
    it(`tokenizes ${JSON.stringify(c.text)} as Python does`, () => {
      const got = tokenizer.encode(c.text);
      expect(got.ids).toEqual(c.ids);
      expect(got.strings).toEqual(c.strings);
      expect(got.kinds).toEqual(c.kinds);
      expect(defaultSelection(got.kinds)).toEqual(c.selected);
      expect(normaliseCaption(c.text, manifest.tokenizer.spellings)).toBe(c.normalised);
      expect(tokenizer.unknownWords(c.text)).toEqual(c.unknown);
      expect(tokenizer.warning(c.text)).toBe(c.warning);
    });
  }

  it("covers unknown words, truncation and non-ASCII letters", () => {
    expect(golden.tokenizer.some((c) => c.unknown.length > 0)).toBe(true);
    expect(golden.tokenizer.some((c) => !c.kinds.includes("pad"))).toBe(true);
    expect(golden.tokenizer.some((c) => /[^\x20-\x7e]/.test(c.text))).toBe(true);
  });
});

describe("torch.randn (golden values from torch)", () => {
  for (const c of golden.noise) {
    it(`draws ${c.n} values for seed ${c.seed}`, () => {
      const got = torchRandn(c.n, c.seed);
      // float32 log/cos/sin in torch (vectorised) against correctly rounded ones: an ulp or two.
      expect(maxRelative(got, c.values)).toBeLessThan(2e-6);
    });
  }

  it("differs between seeds and keeps only a seed's low 32 bits", () => {
    expect(torchRandn(16, 1)[0]).not.toBe(torchRandn(16, 2)[0]);
    expect(Array.from(torchRandn(20, 2 ** 32 + 5))).toEqual(Array.from(torchRandn(20, 5)));
  });

  it("refuses negative or fractional seeds", () => {
    expect(() => torchRandn(4, -1)).toThrow(/seed/);
    expect(() => torchRandn(4, 1.5)).toThrow(/seed/);
  });
});

describe("DPM-Solver++ (golden values from diffusers)", () => {
  for (const c of golden.scheduler) {
    it(`runs ${c.steps} steps as diffusers does`, () => {
      const run = new DPMSolverMultistep(dpm, c.steps);
      expect(run.timesteps).toEqual(c.timesteps);
      expect(maxRelative(run.sigmas, c.sigmas)).toBeLessThan(1e-5);
      let sample: Float32Array = Float32Array.from(c.start);
      c.model_outputs.forEach((output, i) => {
        sample = run.step(Float32Array.from(output), sample);
        expect(maxRelative(sample, c.samples[i])).toBeLessThan(1e-4);
      });
      expect(() => run.step(Float32Array.from(c.start), sample)).toThrow(/over/);
    });
  }

  it("rounds half to even like NumPy", () => {
    expect([0.5, 1.5, 2.5, -0.5, 2.4].map(roundHalfEven)).toEqual([0, 2, 2, -0, 2]);
    expect(() => timestepsFor(dpm, 0)).toThrow(/steps/);
  });

  it("refuses a scheduler it does not implement, naming it", () => {
    const other = { ...dpm, algorithm_type: "sde-dpmsolver++" };
    expect(() => new DPMSolverMultistep(other, 10)).toThrow(/sde-dpmsolver\+\+/);
  });
});

describe("flow-matching Euler (golden values from diffusers)", () => {
  it("is the sampler the DiT's manifest names, with the shipped shift", () => {
    expect(flow.class_name).toBe("FlowMatchEulerDiscreteScheduler");
    expect(makeSampler(flow, 4)).toBeInstanceOf(FlowMatchEuler);
    expect(makeSampler(dpm, 4)).toBeInstanceOf(DPMSolverMultistep);
    expect(golden.flow_scheduler.some((c) => c.shift === flow.shift)).toBe(true);
    expect(golden.flow_scheduler.some((c) => c.shift !== 1)).toBe(true);
  });

  for (const c of golden.flow_scheduler) {
    it(`runs ${c.steps} steps with shift ${c.shift} as diffusers does`, () => {
      const run = new FlowMatchEuler({ ...flow, shift: c.shift }, c.steps);
      expect(maxRelative(run.sigmas, c.sigmas)).toBeLessThan(1e-6);
      expect(maxRelative(run.modelTimesteps, c.model_timesteps)).toBeLessThan(1e-6);
      expect(run.timesteps).toEqual(c.model_timesteps.map(roundHalfEven));
      let sample: Float32Array = Float32Array.from(c.start);
      c.model_outputs.forEach((output, i) => {
        const v = Float32Array.from(output);
        // x̂0 = x_t - sigma v, as diffwidget.tracing.noise.predict_x0 computes it.
        expect(maxRelative(run.predictX0(v, sample, i), c.x0[i])).toBeLessThan(1e-6);
        sample = run.step(v, sample);
        expect(maxRelative(sample, c.samples[i])).toBeLessThan(1e-6);
      });
      expect(() => run.step(Float32Array.from(c.start), sample)).toThrow(/over/);
    });
  }

  it("spaces like NumPy's linspace, ending exactly at the stop", () => {
    expect(linspace(1000, 1, 1)).toEqual([1000]);
    expect(linspace(0, 1, 5)).toEqual([0, 0.25, 0.5, 0.75, 1]);
    expect(linspace(1000, 1, 4).at(-1)).toBe(1);
  });

  it("refuses sigma options it does not port, naming them", () => {
    expect(() => new FlowMatchEuler({ ...flow, use_dynamic_shifting: true }, 4)).toThrow(
      /use_dynamic_shifting/,
    );
    expect(() => new FlowMatchEuler({ ...flow, use_karras_sigmas: true }, 4)).toThrow(/karras/);
    expect(() => new FlowMatchEuler(flow, 0)).toThrow(/steps/);
  });
});
