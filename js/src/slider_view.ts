import { setStep, shownStep, stepBy, stepCount } from "./actions";
import { isComputed } from "./data";
import { type Cleanup, h, type Model, onChanges } from "./model";

/** Width of the range input's thumb in chromium/firefox default styles (px). */
const THUMB_PX = 16;

/** Frames per second of playback (slow enough to follow the denoising). */
export const PLAY_FPS = 6;

/** Time-step slider with play/pause; keyboard arrows are bound on `keyTarget`. */
export function sliderView(model: Model, el: HTMLElement, keyTarget: HTMLElement): Cleanup {
  const row = h("div", "dw-slider");
  const play = h("button", "dw-play", "▶");
  play.type = "button";
  play.title = "Play / pause (space)";
  play.setAttribute("aria-label", "play the denoising steps");
  const input = h("input", "dw-range");
  input.type = "range";
  input.min = "0";
  input.step = "1";
  input.setAttribute("aria-label", "denoising step");
  const label = h("span", "dw-step-label");
  label.setAttribute("aria-live", "polite");
  // Marks under the track at the steps where the chosen heavy overlay is computed.
  const track = h("div", "dw-track");
  const marks = h("div", "dw-marks");
  marks.setAttribute("aria-label", "steps with a computed map");
  track.append(input, marks);
  row.append(play, track, label);
  el.appendChild(row);
  let timer: ReturnType<typeof setInterval> | null = null;

  const stop = (): void => {
    if (timer !== null) clearInterval(timer);
    timer = null;
    play.textContent = "▶";
  };
  const start = (): void => {
    if (shownStep(model) >= stepCount(model) - 1) setStep(model, 0);
    timer = setInterval(() => {
      if (shownStep(model) >= stepCount(model) - 1) stop();
      else stepBy(model, 1);
    }, 1000 / PLAY_FPS);
    play.textContent = "⏸";
  };
  const toggle = (): void => (timer === null ? start() : stop());

  const update = (): void => {
    const n = stepCount(model);
    input.max = String(Math.max(0, n - 1));
    const step = shownStep(model);
    input.value = String(step);
    const t = model.get("timesteps")[step];
    label.textContent = `step ${step} / ${n - 1} · t = ${t ?? "?"}`;
  };
  const updateMarks = (): void => {
    marks.replaceChildren();
    const kind = model.get("overlay");
    if (!isComputed(kind)) return;
    const n = stepCount(model);
    for (const step of model.get("overlays")[kind]?.steps ?? []) {
      const f = n > 1 ? step / (n - 1) : 0;
      const mark = h("span", "dw-mark");
      mark.dataset.step = String(step);
      // The thumb's centre travels from THUMB/2 to width - THUMB/2.
      mark.style.left = `calc(${(f * 100).toFixed(2)}% + ${((0.5 - f) * THUMB_PX).toFixed(1)}px)`;
      marks.appendChild(mark);
    }
  };
  const onInput = (): void => setStep(model, Number(input.value));
  const onKey = (event: KeyboardEvent): void => {
    if (event.target instanceof HTMLInputElement && event.target !== input) return;
    const moves: Record<string, number> = {
      ArrowLeft: -1,
      ArrowRight: 1,
      ArrowDown: -1,
      ArrowUp: 1,
    };
    if (event.key in moves) {
      stepBy(model, moves[event.key] as number);
    } else if (event.key === "Home") {
      setStep(model, 0);
    } else if (event.key === "End") {
      setStep(model, stepCount(model) - 1);
    } else if (event.key === " ") {
      toggle();
    } else {
      return;
    }
    event.preventDefault(); // the range input would move a second time
  };
  input.addEventListener("input", onInput);
  play.addEventListener("click", toggle);
  keyTarget.addEventListener("keydown", onKey);
  const off = onChanges(model, ["step", "timesteps"], update);
  const offMarks = onChanges(model, ["overlay", "overlays", "timesteps"], updateMarks);
  update();
  updateMarks();
  return () => {
    stop();
    off();
    offMarks();
    input.removeEventListener("input", onInput);
    play.removeEventListener("click", toggle);
    keyTarget.removeEventListener("keydown", onKey);
    row.remove();
  };
}
