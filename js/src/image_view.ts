import { shownStep } from "./actions";
import { buildLut, colourise } from "./colormap";
import { frameAt, overlayMap, resizeBilinear, shownAttention } from "./data";
import { type Cleanup, h, type Model, onChanges } from "./model";

/** Side of the drawn view in CSS pixels; previews are scaled up to it. */
export const VIEW_SIZE = 384;
/** Side of the overlay's pixels when there is no image to match. */
export const OVERLAY_FALLBACK = 128;

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
  // Scratch canvases and buffers, reused across frames (no allocation per redraw).
  const base = document.createElement("canvas");
  const over = document.createElement("canvas");
  const octx = over.getContext("2d");
  let overlayPixels: ImageData | undefined;
  let upsampled = new Uint8Array(0);
  let scratch = new Float32Array(0);
  let draws = 0;

  /** Overlay buffers of `height` x `width` (made again only when the size changes). */
  const overlayBuffers = (height: number, width: number): ImageData | undefined => {
    if (over.width !== width || over.height !== height || !overlayPixels) {
      over.width = width;
      over.height = height;
      overlayPixels = octx?.createImageData(width, height);
      upsampled = new Uint8Array(width * height);
    }
    return overlayPixels;
  };

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
      attention: shownAttention(model),
      overlays: model.get("overlays"),
    });
    // Maps arrive on their own (often non-square) grid: upsampled here, bilinearly with the
    // kernel's convention, to the image's own pixels (never below the map's), then scaled to
    // the view with the canvas's smoothing like any picture.
    const height = Math.max(frame?.height ?? OVERLAY_FALLBACK, map?.height ?? 0);
    const width = Math.max(frame?.width ?? OVERLAY_FALLBACK, map?.width ?? 0);
    const pixels = map && octx ? overlayBuffers(height, width) : undefined;
    if (map && octx && pixels) {
      if (scratch.length < map.height * width) scratch = new Float32Array(map.height * width);
      resizeBilinear(map, height, width, upsampled, scratch);
      colourise(upsampled, lut, model.get("opacity"), pixels.data);
      octx.putImageData(pixels, 0, 0);
      ctx.imageSmoothingEnabled = true;
      ctx.drawImage(over, 0, 0, VIEW_SIZE, VIEW_SIZE);
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
      "attention_filtered",
      "attention_layer",
      "attention_head",
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
