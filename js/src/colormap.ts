/** Inferno control points (matplotlib), evenly spaced in [0, 1]. */
const INFERNO: readonly [number, number, number][] = [
  [0, 0, 4],
  [40, 11, 84],
  [101, 21, 110],
  [159, 42, 99],
  [212, 72, 66],
  [245, 125, 21],
  [250, 193, 39],
  [252, 255, 164],
];

/** Number of entries in a lookup table (one per uint8 value). */
export const LUT_SIZE = 256;

/** A 256-entry RGB lookup table interpolated from the control points. */
export function buildLut(stops: readonly [number, number, number][] = INFERNO): Uint8Array {
  const lut = new Uint8Array(LUT_SIZE * 3);
  const segments = stops.length - 1;
  for (let i = 0; i < LUT_SIZE; i++) {
    const x = (i / (LUT_SIZE - 1)) * segments;
    const k = Math.min(Math.floor(x), segments - 1);
    const f = x - k;
    const a = stops[k] as [number, number, number];
    const b = stops[k + 1] as [number, number, number];
    for (let c = 0; c < 3; c++) lut[i * 3 + c] = Math.round(a[c] * (1 - f) + b[c] * f);
  }
  return lut;
}

/** Colour a uint8 map into RGBA pixels with per-pixel alpha = value × opacity. */
export function colourise(
  values: Uint8Array,
  lut: Uint8Array,
  opacity: number,
  out: Uint8ClampedArray,
): void {
  for (let i = 0; i < values.length; i++) {
    const v = values[i] as number;
    out[i * 4] = lut[v * 3] as number;
    out[i * 4 + 1] = lut[v * 3 + 1] as number;
    out[i * 4 + 2] = lut[v * 3 + 2] as number;
    // Low values fade out so the image stays readable under weak saliency.
    out[i * 4 + 3] = Math.round(255 * opacity * (0.25 + (0.75 * v) / 255));
  }
}
