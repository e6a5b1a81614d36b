import { selectGridCell, setStep } from "./actions";
import { float32Of } from "./data";
import type { Model } from "./model";
import {
  type CellScale,
  type GridData,
  type GridGroup,
  type GridSource,
  OVERLAY_LABELS,
} from "./schema";

/** Colour of a cell whose value is missing (a step not computed, NaN). */
export const MISSING_RGB: readonly [number, number, number] = [204, 204, 204];

/** Whether each cell of `grid` is one number (the causal grid), not a map. */
export function isScalarGrid(grid: GridData): boolean {
  return grid.cells != null;
}

/** A grid source's name in menus and captions. */
export function gridSourceLabel(source: GridSource): string {
  if (source === "none") return "closed";
  if (source === "patching") return "causal (activation patching)";
  if (source === "concept") return "concept word (per layer)";
  return OVERLAY_LABELS[source];
}

/** The number in cell (row `index` of `group`, step column `column`), or null when none. */
export function cellValue(group: GridGroup, index: number, column: number): number | null {
  const values = group.values;
  if (values?.dtype !== "float32" || values.shape.length !== 2) return null;
  const [rows, columns] = values.shape as [number, number];
  if (index < 0 || index >= rows || column < 0 || column >= columns) return null;
  const value = float32Of(values)[index * columns + column];
  return value === undefined || Number.isNaN(value) ? null : value;
}

/** Place of `value` on the scale as a colour-map index, 0 at `low` to 255 at `high`. */
export function cellCode(value: number, cells: CellScale): number {
  const span = cells.high - cells.low;
  const share = span > 0 ? (value - cells.low) / span : 0;
  return Math.round(Math.min(1, Math.max(0, share)) * 255);
}

/** The RGB of a cell's value from the colour map's lookup table (grey when missing). */
export function cellRgb(
  value: number | null,
  cells: CellScale,
  lut: Uint8Array,
): readonly [number, number, number] {
  if (value === null) return MISSING_RGB;
  const code = cellCode(value, cells) * 3;
  return [lut[code] as number, lut[code + 1] as number, lut[code + 2] as number];
}

/**
 * Fill a `size` × `size` square at (x0, y0) of an RGBA image `width` × `height` with one
 * colour, clipped to the image (a cell scrolled half out of view).
 */
export function paintSquare(
  data: Uint8ClampedArray,
  width: number,
  height: number,
  x0: number,
  y0: number,
  size: number,
  rgb: readonly [number, number, number],
): void {
  for (let y = Math.max(0, y0); y < Math.min(height, y0 + size); y++) {
    for (let x = Math.max(0, x0); x < Math.min(width, x0 + size); x++) {
      const at = (y * width + x) * 4;
      data[at] = rgb[0];
      data[at + 1] = rgb[1];
      data[at + 2] = rgb[2];
      data[at + 3] = 255;
    }
  }
}

/** A value as the hover and the scale text write it (three significant digits). */
export function formatValue(value: number): string {
  if (value === 0) return "0";
  return Math.abs(value) >= 0.001 && Math.abs(value) < 1000
    ? String(Number(value.toPrecision(3)))
    : value.toExponential(2);
}

/** What the pointer is over: layer and step, and the value for a grid of numbers. */
export function cellHoverText(
  grid: GridData,
  group: GridGroup,
  index: number,
  column: number,
): string {
  const where = `layer ${group.layers[index] ?? "?"} · step ${grid.steps[column] ?? "?"}`;
  if (!grid.cells) return where;
  const value = cellValue(group, index, column);
  return `${where} · value ${value === null ? "not computed" : formatValue(value)}`;
}

/** The colour-scale text of a grid of numbers: its two ends and what a value means. */
export function cellScaleText(cells: CellScale): string {
  return (
    `colour scale inferno, dark ${formatValue(cells.low)} to bright ` +
    `${formatValue(cells.high)}: ${cells.meaning}`
  );
}

/** What clicking a cell does, for the caption. */
export function clickText(source: GridSource): string {
  if (source === "patching") return "Click a cell to show its step";
  if (source === "concept") return "Click a cell to show the word's concept map at its step";
  return "Click a cell to show that layer at that step";
}

/** Jump to a clicked cell: the causal grid has no map to show, only its step. */
export function selectCell(model: Model, source: GridSource, layer: string, step: number): void {
  if (source === "patching" || source === "none") {
    setStep(model, step);
    model.save_changes();
    return;
  }
  selectGridCell(model, source, layer, step);
}
