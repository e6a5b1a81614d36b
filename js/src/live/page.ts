/**
 * The live page for students: a caption box first; seed, guidance and step count as controls
 * that regenerate at once; the denoising as a strip of steps above the explorer (slider,
 * token chips, one overlay at a time); the explorer's long captions folded to one line (a
 * click unfolds them); an optional second caption side by side on the same slider. A page
 * with several models (the UNet and the DiT) shows each caption through each model side by
 * side, each model at its own guidance scale.
 */
import { mount } from "../index";
import { LocalModel } from "../local_model";
import { type Cleanup, h } from "../model";
import {
  type AssetSource,
  loadAssets,
  type ModelConfig,
  type PageConfig,
  wasmProblem,
} from "./assets";
import { runFromFirst } from "./first";
import { checkManifest, type LiveManifest } from "./manifest";
import { attentionGrid, stateFromRun } from "./payloads";
import { type GenerateRequest, type LiveModel, type LiveRun, LiveModel as Model } from "./runtime";

/** Wait after the last control change before regenerating (milliseconds). */
const DEBOUNCE_MS = 250;
const THUMB = 40;
const MAX_STEPS_CONTROL = 50;

export const PAGE_STYLES = `
.dwl-root { font: 14px system-ui, sans-serif; color: #222; max-width: 1100px; }
.dwl-captions { display: flex; gap: 8px; flex-wrap: wrap; align-items: center; }
.dwl-caption-input { flex: 1 1 320px; font-size: 18px; padding: 6px 8px; }
.dwl-controls { display: flex; gap: 16px; flex-wrap: wrap; margin: 8px 0; align-items: center; }
.dwl-controls label { display: flex; gap: 6px; align-items: center; }
.dwl-status { min-height: 1.4em; color: #555; }
.dwl-warning { color: #8a4b00; font-size: 13px; }
.dwl-error { color: #a00; font-weight: 600; }
.dwl-panels { display: flex; gap: 16px; flex-wrap: wrap; align-items: flex-start; }
.dwl-panel { flex: 1 1 480px; min-width: 0; }
.dwl-strip { display: flex; gap: 2px; overflow-x: auto; margin: 6px 0; }
.dwl-strip canvas { width: ${THUMB}px; height: ${THUMB}px; image-rendering: pixelated; cursor: pointer;
  border: 2px solid transparent; }
.dwl-strip canvas.dwl-current { border-color: #e15759; }
.dwl-panel .dw-caption { display: -webkit-box; -webkit-line-clamp: 1; -webkit-box-orient: vertical;
  overflow: hidden; cursor: pointer; }
.dwl-panel .dw-caption::before { content: "▸ "; }
.dwl-panel.dwl-unfolded .dw-caption { display: block; }
.dwl-panel.dwl-unfolded .dw-caption::before { content: "▾ "; }
.dwl-licences { margin-top: 24px; font-size: 12px; color: #555; }
.dwl-model { font-weight: 600; margin: 4px 0; }
`;

interface Panel {
  /** Which caption box (0, or 1 for the comparison) and which model of the page. */
  caption: number;
  modelIndex: number;
  input: HTMLInputElement;
  warning: HTMLElement;
  strip: HTMLElement;
  host: HTMLElement;
  element: HTMLElement;
  model: LocalModel | null;
  cleanup: Cleanup | null;
  run: LiveRun | null;
}

/** What tests and the benchmark read from `window.diffwidgetLive`. */
export interface LiveHandle {
  /** The page's first model (`models[0]`). */
  model: LiveModel | null;
  models: LiveModel[];
  ready: Promise<void>;
  /** Generate the captions in the boxes once the runtime is ready; resolves with the runs. */
  generate(): Promise<LiveRun[]>;
  panels: { model: LocalModel | null; run: LiveRun | null }[];
  /** Milliseconds from start() to the first image on screen (the precomputed one if any). */
  firstImageMs: number;
  /** The same moment in milliseconds since navigation started (performance.now()). */
  firstImageAt: number;
  /** Whether the first image was the run computed when the page was written. */
  precomputed: boolean;
  /** Milliseconds from start() to the end of the first generation in the browser. */
  firstLiveMs: number;
  /** The same moment in milliseconds since navigation started. */
  firstLiveAt: number;
  /** Milliseconds from start() until the models were ready (assets decoded, sessions made). */
  loadMs: number;
  /** Milliseconds from start() until the assets were decoded and checked. */
  assetsMs: number;
  error: string;
}

function drawThumb(canvas: HTMLCanvasElement, rgb: Uint8Array, size: number): void {
  canvas.width = size;
  canvas.height = size;
  const ctx = canvas.getContext("2d");
  if (!ctx) return;
  const image = ctx.createImageData(size, size);
  for (let i = 0; i < size * size; i++) {
    image.data[4 * i] = rgb[3 * i];
    image.data[4 * i + 1] = rgb[3 * i + 1];
    image.data[4 * i + 2] = rgb[3 * i + 2];
    image.data[4 * i + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
}

function numberInput(label: string, value: number, min: number, max: number, step: number) {
  const wrap = h("label", "dwl-control", label);
  const input = h("input", "dwl-number");
  input.type = "number";
  input.min = String(min);
  input.max = String(max);
  input.step = String(step);
  input.value = String(value);
  input.setAttribute("aria-label", label);
  wrap.appendChild(input);
  return { wrap, input };
}

function rangeInput(label: string, value: number, min: number, max: number, step: number) {
  const wrap = h("label", "dwl-control", label);
  const input = h("input", "dwl-range");
  input.type = "range";
  input.min = String(min);
  input.max = String(max);
  input.step = String(step);
  input.value = String(value);
  input.setAttribute("aria-label", label);
  const shown = h("span", "dwl-value", input.value);
  input.addEventListener("input", () => {
    shown.textContent = input.value;
  });
  wrap.append(input, shown);
  return { wrap, input };
}

interface Defaults {
  default_steps?: number;
  default_guidance?: number;
}

/** Build the page in `root` and start loading the models; returns the handle tests read. */
export function startPage(root: HTMLElement, source: AssetSource, config: PageConfig): LiveHandle {
  const started = performance.now();
  const models: ModelConfig[] = Array.isArray(config.models) ? config.models : [];
  const several = models.length > 1;
  const first = (models[0]?.manifest ?? {}) as Defaults;
  const style = document.createElement("style");
  style.textContent = PAGE_STYLES;
  const page = h("div", "dwl-root");
  const captions = h("div", "dwl-captions");
  const status = h("div", "dwl-status", "loading the model in your browser…");
  status.setAttribute("role", "status");
  status.setAttribute("aria-live", "polite");
  const button = h("button", "dwl-generate", "Loading the model…");
  button.type = "button";
  // Until onnxruntime-web is ready nothing can be generated; the button says so.
  button.disabled = true;
  const seed = numberInput("seed", 0, 0, 2 ** 32 - 1, 1);
  // Each model at its own recommended guidance scale (one slider per model).
  const guidances = models.map((m) =>
    rangeInput(
      several ? `guidance (${m.label.split(":")[0]})` : "guidance",
      (m.manifest as Defaults).default_guidance ?? 3,
      1.5,
      10,
      0.5,
    ),
  );
  const steps = rangeInput("steps", first.default_steps ?? 20, 1, MAX_STEPS_CONTROL, 1);
  const compare = h("label", "dwl-control", "compare a second caption");
  const compareBox = h("input", "dwl-compare");
  compareBox.type = "checkbox";
  compareBox.checked = config.compare !== "";
  compare.prepend(compareBox);
  const controls = h("div", "dwl-controls");
  controls.append(seed.wrap, ...guidances.map((g) => g.wrap), steps.wrap, compare);
  const panelsEl = h("div", "dwl-panels");
  page.append(captions, controls, status, panelsEl);
  root.append(style, page);

  const makeInput = (text: string): HTMLInputElement => {
    const input = h("input", "dwl-caption-input");
    input.type = "text";
    input.value = text;
    input.placeholder = "type a caption, e.g. a large red circle on the left";
    input.setAttribute("aria-label", "caption");
    return input;
  };
  const inputs = [makeInput(config.prompt), makeInput(config.compare || config.prompt)];
  const makePanel = (caption: number, modelIndex: number): Panel => {
    const element = h("div", "dwl-panel");
    const warning = h("div", "dwl-warning");
    const strip = h("div", "dwl-strip");
    strip.setAttribute("aria-label", "denoising steps");
    const host = h("div", "dwl-explorer");
    if (several) element.append(h("div", "dwl-model", models[modelIndex].label));
    element.append(warning, strip, host);
    // One click on the explorer's caption unfolds or folds it.
    host.addEventListener("click", (event) => {
      if ((event.target as HTMLElement).classList.contains("dw-caption")) {
        element.classList.toggle("dwl-unfolded");
      }
    });
    const input = inputs[caption];
    return {
      caption,
      modelIndex,
      input,
      warning,
      strip,
      host,
      element,
      model: null,
      cleanup: null,
      run: null,
    };
  };
  const panels = [0, 1].flatMap((caption) => models.map((_, m) => makePanel(caption, m)));
  captions.append(inputs[0], button, inputs[1]);
  for (const p of panels) panelsEl.appendChild(p.element);
  const showCompare = (): void => {
    const on = compareBox.checked;
    inputs[1].hidden = !on;
    for (const p of panels) if (p.caption === 1) p.element.hidden = !on;
  };
  showCompare();

  const handle: LiveHandle = {
    model: null,
    models: [],
    ready: Promise.resolve(),
    generate: async () => [],
    panels,
    firstImageMs: Number.NaN,
    firstImageAt: Number.NaN,
    precomputed: false,
    firstLiveMs: Number.NaN,
    firstLiveAt: Number.NaN,
    loadMs: Number.NaN,
    assetsMs: Number.NaN,
    error: "",
  };
  const fail = (message: string): void => {
    handle.error = message;
    status.textContent = message;
    status.className = "dwl-status dwl-error";
    button.disabled = true;
  };
  const problem = models.length === 0 ? "the page names no model" : wasmProblem();
  if (problem) {
    fail(problem);
    return handle;
  }

  // Every shown panel follows the step of the one the reader moves.
  const linkSteps = (): void => {
    const shown = panels.flatMap((p) => (p.model && !p.element.hidden ? [p.model] : []));
    for (const from of shown) {
      from.on("change:step", () => {
        for (const to of shown) {
          if (to === from) continue;
          const step = Math.min(from.get("step"), to.get("timesteps").length - 1);
          if (to.get("step") !== step) to.set("step", step);
        }
      });
    }
  };

  const showRun = (panel: Panel, manifest: LiveManifest, run: LiveRun): void => {
    panel.cleanup?.();
    const state = stateFromRun(run, manifest, models[panel.modelIndex].facts);
    panel.model = new LocalModel(state);
    panel.run = run;
    panel.cleanup = mount(panel.model.asModel(), panel.host);
    const thumbs = [...panel.strip.querySelectorAll("canvas")];
    const mark = (): void => {
      const step = panel.model?.get("step") ?? 0;
      thumbs.forEach((c, i) => {
        c.classList.toggle("dwl-current", i === step);
      });
    };
    thumbs.forEach((canvas, i) => {
      canvas.addEventListener("click", () => panel.model?.set("step", i));
    });
    panel.model.on("change:step", mark);
    mark();
    // The layer × step grid is the kernel's in a notebook; here the run has every map.
    const grid = (): void => {
      const kind = panel.model?.get("grid");
      panel.model?.set("grid_data", kind === "attention" ? attentionGrid(run, manifest) : null);
    };
    panel.model.on("change:grid", grid);
    if (Number.isNaN(handle.firstImageMs)) {
      handle.firstImageAt = performance.now();
      handle.firstImageMs = handle.firstImageAt - started;
    }
  };

  const drawStrip = (panel: Panel, run: LiveRun, size: number, upTo: number): void => {
    for (let step = panel.strip.childElementCount; step <= upTo; step++) {
      const canvas = h("canvas", "dwl-thumb");
      canvas.title = `step ${step} (t = ${run.timesteps[step]})`;
      drawThumb(canvas, run.previews[step], size);
      panel.strip.appendChild(canvas);
    }
  };

  let generation = 0;
  // A request made while the runtime loads is generated once it is ready.
  let pending = false;
  const generate = async (): Promise<LiveRun[]> => {
    if (handle.models.length === 0) {
      pending = true;
      return [];
    }
    const mine = ++generation;
    const active = panels.filter((p) => !p.element.hidden);
    const runs: LiveRun[] = [];
    for (const panel of active) {
      const model = handle.models[panel.modelIndex];
      const request: GenerateRequest = {
        prompt: panel.input.value,
        seed: Number(seed.input.value),
        steps: Number(steps.input.value),
        guidance: Number(guidances[panel.modelIndex].input.value),
      };
      const problem = model.problem(request);
      if (problem) {
        fail(problem);
        return [];
      }
      panel.warning.textContent = model.tokenizer.warning(request.prompt);
      panel.strip.replaceChildren();
      status.className = "dwl-status";
      button.disabled = false;
      const size = model.manifest.image_hw[0];
      // Each step's preview joins the strip as soon as it is computed.
      const run = await model.generate(request, (step, partial) => {
        drawStrip(panel, partial, size, step);
        status.textContent = `denoising: step ${step + 1} of ${request.steps}`;
      });
      if (mine !== generation) return runs; // a newer request replaced this one
      showRun(panel, model.manifest, run);
      runs.push(run);
      if (Number.isNaN(handle.firstLiveMs)) {
        handle.firstLiveAt = performance.now();
        handle.firstLiveMs = handle.firstLiveAt - started;
      }
      status.textContent = `generated in the browser in ${(run.millis / 1000).toFixed(2)} s (no kernel, no server)`;
    }
    linkSteps();
    return runs;
  };
  // Callers (tests, the benchmark) wait for the runtime; the page's own controls do not.
  handle.generate = async () => {
    await handle.ready;
    return generate();
  };

  let timer = 0;
  const later = (): void => {
    window.clearTimeout(timer);
    timer = window.setTimeout(() => void generate().catch((e) => fail(String(e))), DEBOUNCE_MS);
  };
  button.addEventListener("click", () => void generate().catch((e) => fail(String(e))));
  for (const input of inputs) {
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") void generate().catch((e) => fail(String(e)));
    });
  }
  for (const input of [seed.input, ...guidances.map((g) => g.input), steps.input])
    input.addEventListener("change", later);
  compareBox.addEventListener("change", () => {
    showCompare();
    later();
  });

  // The first caption as computed when the page was written: drawn as soon as it is
  // decoded (milliseconds), while onnxruntime-web compiles.
  const drawFirst = async (): Promise<void> => {
    const firsts = Array.isArray(config.first) ? config.first : [];
    for (const [i, first] of firsts.entries()) {
      const panel = panels.find((p) => p.caption === 0 && p.modelIndex === i);
      if (!panel || panel.run !== null) break;
      const manifest = checkManifest(models[i].manifest);
      const facts = models[i].facts;
      const tail = { string: facts.tail_token, kind: facts.tail_kind };
      const run = await runFromFirst(first, manifest, tail);
      const { prompt, seed: s, steps: n, guidance: g } = run.request;
      const controls = [Number(seed.input.value), Number(steps.input.value)];
      const guidance = Number(guidances[i].input.value);
      // Drawn only when it is what the page would generate with its controls as they are.
      if (prompt !== inputs[0].value || s !== controls[0] || n !== controls[1] || g !== guidance)
        break;
      if (panel.run !== null) break; // the runtime was faster
      drawStrip(panel, run, manifest.image_hw[0], run.previews.length - 1);
      showRun(panel, manifest, run);
      panel.warning.textContent = run.warning;
      handle.precomputed = true;
    }
    if (handle.precomputed && handle.models.length === 0) {
      status.textContent =
        "this caption was computed ahead; the model is loading in your browser and the " +
        "Generate button works once it is ready…";
    }
  };
  const firstDrawn = drawFirst().catch((error) => {
    console.warn(`the precomputed run is not shown: ${String(error)}`);
  });

  handle.ready = (async () => {
    try {
      // Decoding the graphs holds the main thread: the precomputed image goes first.
      await firstDrawn;
      const assets = await loadAssets(
        source,
        models.map((m) => m.manifest),
      );
      handle.assetsMs = performance.now() - started;
      for (const [i, a] of assets.entries()) {
        const facts = models[i].facts;
        handle.models.push(
          await Model.create(a, { string: facts.tail_token, kind: facts.tail_kind }),
        );
      }
      handle.model = handle.models[0];
      handle.loadMs = performance.now() - started;
      button.textContent = "Generate";
      button.disabled = false;
      const shown = panels.filter((p) => !p.element.hidden);
      if (pending || shown.some((p) => p.run === null)) await generate();
      else status.textContent = "the model is ready in your browser: type a caption";
    } catch (error) {
      fail(`the model could not start in this browser: ${String(error)}`);
    }
  })();
  return handle;
}
