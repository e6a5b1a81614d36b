import { setStep, shownStep } from "./actions";
import { bytesOf, checkPayload } from "./data";
import { type Cleanup, h, type Model, onChanges } from "./model";
import {
  COMMITTED_LEVEL,
  CONCEPT_MAX_CHARS,
  SWITCH_MAX_SEEDS,
  type SwitchFilmstrip,
  type WidgetState,
} from "./schema";

/** Why the switch button cannot run in a kernel without a pipeline (the kernel says the same). */
export const NO_PIPELINE = "a prompt switch needs the pipeline: Explorer(trace, pipe=pipe)";
/** Why it cannot run in a saved page. */
export const NO_KERNEL = "a saved page shows the last switch; running a new one needs the kernel";

/** Why the switch button cannot run now (one line), or null when it can. */
export function switchBlocked(state: Pick<WidgetState, "actions" | "switch_words">): string | null {
  if (!state.actions.includes("cancel")) return NO_KERNEL;
  if (!state.actions.includes("prompt_switch")) return NO_PIPELINE;
  if (state.switch_words.length === 0) return "the prompt has no content word to switch";
  return null;
}

/** Label of the thumbnail of switch step `k` (k = n_steps is prompt A's own image). */
export function switchLabel(k: number, nSteps: number): string {
  return k >= nSteps ? "no switch (A)" : `switch at ${k}`;
}

/** One filmstrip thumbnail: its switch step, label, highlight and RGBA pixels. */
export interface FilmstripFrame {
  step: number;
  label: string;
  current: boolean;
  width: number;
  height: number;
  rgba: Uint8ClampedArray<ArrayBuffer>;
}

/** The thumbnails of a filmstrip; [] when there is none or its buffer does not fit its shape. */
export function filmstripFrames(film: SwitchFilmstrip | null, step: number): FilmstripFrame[] {
  if (!film || checkPayload(film.images) || film.images.shape.length !== 4) return [];
  const [k, height, width, channels] = film.images.shape as [number, number, number, number];
  if (channels !== 3 || k !== film.steps.length) return [];
  const bytes = bytesOf(film.images);
  const frame = height * width * 3;
  return film.steps.map((s, i) => {
    const rgb = bytes.subarray(i * frame, (i + 1) * frame);
    const rgba = new Uint8ClampedArray(height * width * 4);
    for (let p = 0, q = 0; p < rgb.length; p += 3, q += 4) {
      rgba[q] = rgb[p] as number;
      rgba[q + 1] = rgb[p + 1] as number;
      rgba[q + 2] = rgb[p + 2] as number;
      rgba[q + 3] = 255;
    }
    return {
      step: s,
      label: switchLabel(s, film.n_steps),
      current: s === step,
      width,
      height,
      rgba,
    };
  });
}

/** What the filmstrip shows, in words (prompt B and when each attribute committed). */
export function filmstripSummary(film: SwitchFilmstrip): string {
  const seeds = film.n_seeds === 1 ? "1 seed" : `${film.n_seeds} seeds`;
  const level = `${Math.round(COMMITTED_LEVEL * 100)} %`;
  const parts = film.attributes.map((attribute, i) => {
    const k = film.committed[i];
    const value = film.a_values[i] ?? "?";
    return k === null || k === undefined
      ? `${attribute} (${value}) never committed`
      : `${attribute} (${value}) committed from switch step ${k}`;
  });
  return (
    `Switched to “${film.prompt_b}” at each step k: final image of seed ${film.seed}. ` +
    `${parts.join("; ")} (≥ ${level} of ${seeds} keep A’s value).`
  );
}

/**
 * Send the picked word, replacement and seed count (kept in the traits too) and ask for the
 * switch. The count is sent as typed: the kernel refuses one outside 1..SWITCH_MAX_SEEDS.
 */
export function requestSwitch(
  model: Model,
  word: string,
  replacement: string,
  seeds: number,
): void {
  const typed = replacement.trim();
  model.set("switch_word", word);
  model.set("switch_replacement", typed);
  model.set("switch_seeds", seeds);
  model.save_changes();
  // The values travel in the message as well: a refused trait write never runs a stale switch.
  model.send({ kind: "prompt_switch", word, replacement: typed, seeds });
}

/** "When is it decided": the prompt-switch picker and the filmstrip of the last switch. */
export function switchView(model: Model, el: HTMLElement): Cleanup {
  const box = h("figure", "dw-switch");
  box.setAttribute("aria-label", "prompt switch: when is it decided");
  const title = h("figcaption", "dw-panel-title", "When is it decided? Switch a word at step k");
  const form = h("form", "dw-switch-form");
  const word = h("select", "dw-switch-word");
  word.setAttribute("aria-label", "prompt word to switch");
  const replacement = h("input", "dw-switch-replacement");
  replacement.type = "text";
  replacement.maxLength = CONCEPT_MAX_CHARS;
  replacement.placeholder = "replacement";
  replacement.setAttribute("aria-label", "replacement word");
  const seedsLabel = h("label", "dw-switch-seeds-label", "seeds");
  seedsLabel.title =
    "Seeds the switch is judged over: this trace's, then the next seeds, traced first";
  const seeds = h("input", "dw-switch-seeds");
  seeds.type = "number";
  seeds.min = "1";
  seeds.max = String(SWITCH_MAX_SEEDS);
  seeds.step = "1";
  seeds.setAttribute("aria-label", "number of seeds to judge");
  seedsLabel.append(seeds);
  const run = h("button", "dw-switch-run", "switch");
  run.type = "submit";
  run.title = "Switch the word from every step k and judge which value each final image keeps";
  const reason = h("div", "dw-switch-reason");
  form.append(word, h("span", "dw-switch-arrow", "→"), replacement, seedsLabel, run);
  const strip = h("div", "dw-filmstrip");
  strip.setAttribute("role", "group");
  strip.setAttribute("aria-label", "final image of each switch step; click to go to the step");
  const summary = h("div", "dw-switch-summary");
  box.append(title, form, reason, strip, summary);
  el.appendChild(box);
  let thumbs: HTMLButtonElement[] = [];

  const updatePicker = (): void => {
    const words = model.get("switch_words");
    const blocked = switchBlocked({ actions: model.get("actions"), switch_words: words });
    const kernel = model.get("actions").includes("cancel");
    form.hidden = !kernel;
    reason.textContent = kernel && blocked ? blocked : "";
    reason.hidden = !(kernel && blocked);
    run.disabled = blocked !== null;
    word.replaceChildren();
    for (const w of words) {
      const option = h("option", "", w);
      option.value = w;
      word.appendChild(option);
    }
    const chosen = model.get("switch_word");
    if (chosen && words.includes(chosen)) word.value = chosen;
    if (document.activeElement !== replacement) {
      replacement.value = model.get("switch_replacement");
    }
    if (document.activeElement !== seeds) seeds.value = String(model.get("switch_seeds"));
    box.hidden = !kernel && model.get("switch") === null;
  };

  const highlight = (): void => {
    const step = shownStep(model);
    for (const thumb of thumbs) {
      const current = Number(thumb.dataset.step) === step;
      thumb.classList.toggle("dw-thumb-current", current);
      thumb.setAttribute("aria-pressed", String(current));
    }
  };

  const buildStrip = (): void => {
    strip.replaceChildren();
    thumbs = [];
    const film = model.get("switch");
    const frames = filmstripFrames(film, shownStep(model));
    summary.textContent = film && frames.length > 0 ? filmstripSummary(film) : "";
    const n = model.get("timesteps").length;
    for (const frame of frames) {
      const thumb = h("button", "dw-thumb");
      thumb.type = "button";
      thumb.dataset.step = String(frame.step);
      thumb.setAttribute("aria-label", `final image, ${frame.label}`);
      const canvas = h("canvas", "dw-thumb-canvas");
      canvas.width = frame.width;
      canvas.height = frame.height;
      canvas
        .getContext("2d")
        ?.putImageData(new ImageData(frame.rgba, frame.width, frame.height), 0, 0);
      canvas.dataset.drawn = "true";
      thumb.append(canvas, h("span", "dw-thumb-label", frame.label));
      // k = n_steps (prompt A's own image) has no slider position.
      if (frame.step < n) thumb.addEventListener("click", () => setStep(model, frame.step));
      else thumb.disabled = true;
      strip.appendChild(thumb);
      thumbs.push(thumb);
    }
    strip.hidden = frames.length === 0;
    highlight();
    updatePicker();
  };

  const onSubmit = (event: Event): void => {
    event.preventDefault();
    if (run.disabled) return;
    requestSwitch(model, word.value, replacement.value, Number(seeds.value));
  };
  const onKey = (event: KeyboardEvent): void => {
    // Typing is for the box: not the slider's keys nor the notebook's shortcuts.
    event.stopPropagation();
    if (event.key === "Enter") onSubmit(event);
  };
  form.addEventListener("submit", onSubmit);
  replacement.addEventListener("keydown", onKey);
  seeds.addEventListener("keydown", onKey);
  const offPicker = onChanges(
    model,
    ["actions", "switch_words", "switch_word", "switch_replacement", "switch_seeds"],
    updatePicker,
  );
  const offStrip = onChanges(model, ["switch", "timesteps"], buildStrip);
  const offStep = onChanges(model, ["step"], highlight);
  buildStrip();
  return () => {
    offPicker();
    offStrip();
    offStep();
    box.remove();
  };
}
