import { shownStep } from "./actions";
import { buildLut, colourise } from "./colormap";
import { frameAt, overlayMap } from "./data";
import { type Cleanup, h, type Model, onChanges } from "./model";

/** Side of the drawn view in CSS pixels; previews are scaled up to it. */
export const VIEW_SIZE = 384;

/** Canvas with the image of the current step and the overlay on top. */
export function imageView(model: Model, el: HTMLElement): Cleanup {
  const canvas = h("canvas", "dw-canvas");
  canvas.width = VIEW_SIZE;
  canvas.height = VIEW_SIZE;
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", "image at the current step");
  el.appendChild(canvas);
  const ctx = canvas.getContext("2d");
  const lut = buildLut();
  // Scratch canvases at native resolution, reused across frames (no allocation per redraw).
  const base = document.createElement("canvas");
  const over = document.createElement("canvas");
  let draws = 0;

  const draw = (): void => {
    if (!ctx) return;
    const started = performance.now();
    const step = shownStep(model);
    const source = model.get("image_mode") === "noisy" ? "noisy_previews" : "previews";
    const frame = frameAt(model.get(source), step);
    ctx.clearRect(0, 0, VIEW_SIZE, VIEW_SIZE);
    if (frame) {
      if (base.width !== frame.width || base.height !== frame.height) {
        base.width = frame.width;
        base.height = frame.height;
      }
      const bctx = base.getContext("2d");
      if (bctx) {
        const img = bctx.createImageData(frame.width, frame.height);
        for (let i = 0, j = 0; i < frame.rgb.length; i += 3, j += 4) {
          img.data[j] = frame.rgb[i] as number;
          img.data[j + 1] = frame.rgb[i + 1] as number;
          img.data[j + 2] = frame.rgb[i + 2] as number;
          img.data[j + 3] = 255;
        }
        bctx.putImageData(img, 0, 0);
        ctx.imageSmoothingEnabled = false; // show the model's pixels as they are
        ctx.drawImage(base, 0, 0, VIEW_SIZE, VIEW_SIZE);
      }
    }
    const map = overlayMap({
      overlay: model.get("overlay"),
      step,
      token: model.get("token"),
      attention: model.get("attention"),
      overlays: model.get("overlays"),
    });
    if (map) {
      if (over.width !== map.width || over.height !== map.height) {
        over.width = map.width;
        over.height = map.height;
      }
      const octx = over.getContext("2d");
      if (octx) {
        const img = octx.createImageData(map.width, map.height);
        colourise(map.values, lut, model.get("opacity"), img.data);
        octx.putImageData(img, 0, 0);
        ctx.imageSmoothingEnabled = true; // the latent grid is coarse: interpolate it
        ctx.drawImage(over, 0, 0, VIEW_SIZE, VIEW_SIZE);
      }
    }
    draws += 1;
    // Timing marks for bench/bench_browser.py (ms since navigation start).
    if (draws === 1) canvas.dataset.firstDrawAt = performance.now().toFixed(1);
    canvas.dataset.draws = String(draws);
    canvas.dataset.drawMs = (performance.now() - started).toFixed(3);
    canvas.dataset.step = String(step);
    canvas.dataset.overlay = map ? model.get("overlay") : "none";
  };

  const off = onChanges(
    model,
    [
      "step",
      "token",
      "overlay",
      "opacity",
      "image_mode",
      "previews",
      "noisy_previews",
      "attention",
      "overlays",
      "timesteps",
    ],
    draw,
  );
  draw();
  return () => {
    off();
    canvas.remove();
  };
}

/** Save the canvas as a PNG download named after the step. */
export function exportPng(canvas: HTMLCanvasElement, name: string): void {
  const link = document.createElement("a");
  link.download = name;
  link.href = canvas.toDataURL("image/png");
  link.click();
}
