import { COLORMAP_STOPS } from "./schema";

/** Number of entries in a lookup table (one per uint8 value). */
export const LUT_SIZE = 256;

type Stop = readonly [number, number, number];

/** A 256-entry RGB lookup table interpolated from the schema's colour-map stops. */
export function buildLut(stops: readonly Stop[] = COLORMAP_STOPS): Uint8Array {
  const lut = new Uint8Array(LUT_SIZE * 3);
  const segments = stops.length - 1;
  for (let i = 0; i < LUT_SIZE; i++) {
    const x = (i / (LUT_SIZE - 1)) * segments;
    const k = Math.min(Math.floor(x), segments - 1);
    const f = x - k;
    const a = stops[k] as Stop;
    const b = stops[k + 1] as Stop;
    for (let c = 0; c < 3; c++) lut[i * 3 + c] = Math.round(a[c] * (1 - f) + b[c] * f);
  }
  return lut;
}

/**
 * Colour a uint8 map into RGBA pixels. Alpha grows from 0 at the map's low end to `opacity`
 * at its top, so low values are transparent and the image shows through them.
 */
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
    out[i * 4 + 3] = Math.round((opacity * 255 * v) / 255);
  }
}

/** A CSS gradient of the colour map, low at the bottom (for the colour scale). */
export function cssGradient(stops: readonly Stop[] = COLORMAP_STOPS): string {
  const parts = stops.map(([r, g, b], i) => {
    const at = ((i / (stops.length - 1)) * 100).toFixed(1);
    return `rgb(${r}, ${g}, ${b}) ${at}%`;
  });
  return `linear-gradient(to top, ${parts.join(", ")})`;
}
