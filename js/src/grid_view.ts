import { shownStep } from "./actions";
import { buildLut } from "./colormap";
import { groupCell, resizeBilinear } from "./data";
import {
  cellHoverText,
  cellRgb,
  cellScaleText,
  cellValue,
  clickText,
  paintSquare,
  selectCell,
} from "./grid_cells";
import { type Cleanup, h, type Model, onChanges } from "./model";
import type { GridData, GridGroup } from "./schema";

/** CSS pixels per grid cell (maps are upsampled bilinearly into it). */
export const CELL_PX = 26;
/** Gap between cells (CSS pixels). */
export const GAP_PX = 2;
/** Distance from one cell to the next. */
export const PITCH_PX = CELL_PX + GAP_PX;
/** Height of a group's header line and of the step ticks above the cells. */
export const GROUP_PX = 20;
export const HEADER_PX = 18;
/** Width of the row labels: fitted to the longest label within these bounds. */
export const LABEL_MIN_PX = 96;
export const LABEL_MAX_PX = 280;
/** The grid scrolls (both ways) inside a box at most this tall. */
export const VIEW_MAX_HEIGHT_PX = 420;
const FONT = "11px system-ui, sans-serif";
const BACKGROUND = "#ffffff";
const HEADER_FILL = "#eef1f5";
const TEXT = "#222222";
const MUTED = "#666666";

/** One line of the grid: a group's header, or a layer's row of cells. */
export type GridLine =
  | { kind: "group"; group: number; y: number; height: number }
  | { kind: "row"; group: number; index: number; row: number; y: number; height: number };

/** Where everything is, in content coordinates below the step ticks. */
export interface GridLayout {
  lines: GridLine[];
  /** Height of every line together. */
  height: number;
  columns: number;
  rows: number;
}

/** Lines of `grid` with groups in `collapsed` (group indices) showing only their header. */
export function gridLayout(grid: GridData, collapsed: ReadonlySet<number>): GridLayout {
  const lines: GridLine[] = [];
  let y = 0;
  let row = 0;
  grid.groups.forEach((group, g) => {
    lines.push({ kind: "group", group: g, y, height: GROUP_PX });
    y += GROUP_PX;
    for (let index = 0; index < group.layers.length; index++, row++) {
      if (collapsed.has(g)) continue;
      lines.push({ kind: "row", group: g, index, row, y, height: PITCH_PX });
      y += PITCH_PX;
    }
  });
  return { lines, height: y, columns: grid.steps.length, rows: row };
}

/** Index of the first line whose bottom lies below `y` (binary search). */
export function firstLineAt(layout: GridLayout, y: number): number {
  let lo = 0;
  let hi = layout.lines.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    const line = layout.lines[mid] as GridLine;
    if (line.y + line.height <= y) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** What lies under content point (x right of the labels, y below the ticks). */
export type GridHit =
  | { kind: "cell"; line: GridLine & { kind: "row" }; column: number }
  | { kind: "group"; group: number }
  | null;

/** Hit-test content coordinates: a cell (not its gap), a group header, or nothing. */
export function hitTest(layout: GridLayout, x: number, y: number): GridHit {
  const line = layout.lines[firstLineAt(layout, y)];
  if (!line || y < line.y) return null;
  if (line.kind === "group") return { kind: "group", group: line.group };
  const column = Math.floor(x / PITCH_PX);
  const inCell = x - column * PITCH_PX < CELL_PX && y - line.y < CELL_PX;
  if (x < 0 || column >= layout.columns || !inCell) return null;
  return { kind: "cell", line, column };
}

/** The caption above the grid: what the cells are and which filter applies. */
export function gridCaption(grid: GridData, token: string, head: number): string {
  let text = grid.description;
  if (grid.per_token) text += `; token “${token}”`;
  if (grid.source === "attention" && head >= 0) text += `; head ${head}`;
  if (grid.cells) text += `. ${cellScaleText(grid.cells)}`;
  return `${text}. ${clickText(grid.source)}; click a block to fold it.`;
}

/** A group's header text: its block, its size and its grid. */
export function groupTitle(group: GridGroup, collapsed: boolean): string {
  const n = group.layers.length;
  const [gh, gw] = group.grid;
  const title = `${collapsed ? "▸" : "▾"} ${group.name} · ${n} layer${n === 1 ? "" : "s"}`;
  return group.values ? title : `${title} · ${gh}×${gw}`; // a number per cell has no grid
}

/** `text` cut with an ellipsis to fit `width` pixels. */
function fitText(ctx: CanvasRenderingContext2D, text: string, width: number): string {
  if (ctx.measureText(text).width <= width) return text;
  let lo = 0;
  let hi = text.length;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (ctx.measureText(`…${text.slice(text.length - mid)}`).width <= width) lo = mid;
    else hi = mid - 1;
  }
  return `…${text.slice(text.length - lo)}`;
}

/**
 * Small multiples of per-layer maps (rows, grouped by block) against steps (columns), paper
 * Fig. 8. One canvas the size of the visible box draws only the cells in view, the row
 * labels and step ticks stay in place while the cells scroll, and scrubbing moves two
 * outline boxes without redrawing a cell.
 */
export function gridView(model: Model, el: HTMLElement): Cleanup {
  const box = h("figure", "dw-grid");
  box.setAttribute("aria-label", "layer × step grid");
  const caption = h("figcaption", "dw-grid-caption");
  const viewport = h("div", "dw-grid-viewport");
  const scroll = h("div", "dw-grid-scroll");
  const sizer = h("div", "dw-grid-sizer");
  const canvas = h("canvas", "dw-grid-canvas");
  canvas.setAttribute("role", "img");
  const column = h("div", "dw-grid-column");
  const row = h("div", "dw-grid-row");
  const hover = h("p", "dw-grid-hover");
  hover.setAttribute("aria-live", "polite");
  scroll.appendChild(sizer);
  viewport.append(scroll, canvas, column, row);
  box.append(caption, viewport, hover);
  el.appendChild(box);
  scroll.style.maxHeight = `${VIEW_MAX_HEIGHT_PX}px`;
  const lut = buildLut();
  const cellValues = new Uint8Array(CELL_PX * CELL_PX);
  const cellScratch = new Float32Array(CELL_PX * CELL_PX * 4);
  const collapsed = new Set<number>();
  let layout: GridLayout | null = null;
  let labelPx = LABEL_MIN_PX;
  // The scroll box's size and offsets as of the last draw: scrubbing moves the outlines
  // from these, never reading layout (a read would force a reflow of the page per frame).
  const view = { width: 0, height: 0, left: 0, top: 0 };
  let shown: GridData | null = null;
  let frame = 0;

  const selectedRow = (grid: GridData): number => {
    const value =
      grid.source === "attention" ? model.get("attention_layer") : model.get("saliency_layer");
    if (model.get("overlay") !== grid.source) return -1;
    let offset = 0;
    for (const group of grid.groups) {
      const index = group.layers.indexOf(value);
      if (index >= 0) return offset + index;
      offset += group.layers.length;
    }
    return -1;
  };

  const highlight = (): void => {
    const grid = model.get("grid_data");
    if (!grid || !layout) return;
    const { width: vw, height: vh, left: sx, top: sy } = view;
    const index = grid.steps.indexOf(shownStep(model));
    const left = labelPx + index * PITCH_PX - sx - 1;
    column.hidden = index < 0 || left < labelPx - 1 || left > vw;
    column.style.left = `${left}px`;
    column.style.top = `${HEADER_PX}px`;
    column.style.height = `${Math.max(0, Math.min(vh, HEADER_PX + layout.height - sy) - HEADER_PX)}px`;
    const selected = selectedRow(grid);
    const line = layout.lines.find((l) => l.kind === "row" && l.row === selected);
    const top = line ? HEADER_PX + line.y - sy - 1 : -1;
    row.hidden = !line || top < HEADER_PX - 1 || top > vh;
    row.style.top = `${top}px`;
    row.style.left = `${labelPx}px`;
    row.style.width = `${Math.max(0, Math.min(vw, labelPx + layout.columns * PITCH_PX - sx) - labelPx)}px`;
    box.dataset.step = String(index >= 0 ? grid.steps[index] : -1);
  };

  const paintCells = (ctx: CanvasRenderingContext2D, grid: GridData, vw: number, vh: number) => {
    if (!layout) return 0;
    const width = Math.max(1, vw - labelPx);
    const height = Math.max(1, vh - HEADER_PX);
    const image = ctx.createImageData(width, height);
    image.data.fill(255);
    const { left: sx, top: sy } = view;
    const c0 = Math.floor(sx / PITCH_PX);
    const c1 = Math.min(layout.columns, Math.ceil((sx + width) / PITCH_PX));
    const token = model.get("token");
    let drawn = 0;
    for (let k = firstLineAt(layout, sy); k < layout.lines.length; k++) {
      const line = layout.lines[k] as GridLine;
      if (line.y >= sy + height) break;
      if (line.kind !== "row") continue;
      const group = grid.groups[line.group] as GridGroup;
      for (let c = c0; c < c1; c++) {
        if (grid.cells) {
          const rgb = cellRgb(cellValue(group, line.index, c), grid.cells, lut);
          paintSquare(image.data, width, height, c * PITCH_PX - sx, line.y - sy, CELL_PX, rgb);
          drawn += 1;
          continue;
        }
        const cell = groupCell(grid, group, line.index, c, token);
        if (!cell) continue;
        resizeBilinear(cell, CELL_PX, CELL_PX, cellValues, cellScratch);
        const x0 = c * PITCH_PX - sx;
        const y0 = line.y - sy;
        for (let yy = Math.max(0, -y0); yy < CELL_PX && y0 + yy < height; yy++) {
          let out = ((y0 + yy) * width + Math.max(0, x0)) * 4;
          for (let xx = Math.max(0, -x0); xx < CELL_PX && x0 + xx < width; xx++, out += 4) {
            const v = (cellValues[yy * CELL_PX + xx] as number) * 3;
            image.data[out] = lut[v] as number;
            image.data[out + 1] = lut[v + 1] as number;
            image.data[out + 2] = lut[v + 2] as number;
          }
        }
        drawn += 1;
      }
    }
    ctx.putImageData(image, labelPx, HEADER_PX);
    return drawn;
  };

  const paintText = (ctx: CanvasRenderingContext2D, grid: GridData, vw: number, vh: number) => {
    if (!layout) return;
    const { left: sx, top: sy } = view;
    ctx.font = FONT;
    ctx.textBaseline = "middle";
    ctx.fillStyle = BACKGROUND;
    ctx.fillRect(0, 0, labelPx, vh);
    ctx.fillRect(labelPx, 0, vw - labelPx, HEADER_PX);
    for (let k = firstLineAt(layout, sy); k < layout.lines.length; k++) {
      const line = layout.lines[k] as GridLine;
      const y = HEADER_PX + line.y - sy;
      if (y >= vh) break;
      const group = grid.groups[line.group] as GridGroup;
      if (line.kind === "group") {
        ctx.fillStyle = HEADER_FILL;
        ctx.fillRect(0, y, vw, GROUP_PX - 2);
        ctx.fillStyle = TEXT;
        ctx.fillText(groupTitle(group, collapsed.has(line.group)), 4, y + GROUP_PX / 2 - 1);
      } else {
        ctx.fillStyle = TEXT;
        const label = fitText(ctx, group.labels[line.index] ?? "", labelPx - 10);
        ctx.fillText(label, 10, y + CELL_PX / 2);
      }
    }
    // Ticks above the cells, drawn last so the rows scroll under them.
    ctx.fillStyle = BACKGROUND;
    ctx.fillRect(0, 0, vw, HEADER_PX);
    ctx.fillStyle = MUTED;
    ctx.fillText("layer \\ step", 4, HEADER_PX / 2);
    const columns = layout.columns;
    const every = columns > 10 ? 5 : 1;
    grid.steps.forEach((step, c) => {
      if (c % every !== 0 && c !== columns - 1) return;
      const x = labelPx + c * PITCH_PX - sx;
      if (x < labelPx || x > vw - 4) return;
      ctx.fillText(String(step), x + 2, HEADER_PX / 2);
    });
  };

  const draw = (): void => {
    frame = 0;
    const grid = model.get("grid_data");
    box.hidden = !grid || grid.source !== model.get("grid");
    if (!grid || box.hidden) {
      shown = null;
      return;
    }
    const started = performance.now();
    if (grid !== shown) {
      if (!shown || shown.source !== grid.source) collapsed.clear();
      shown = grid;
      const ctx = canvas.getContext("2d");
      if (ctx) {
        ctx.font = FONT;
        const widest = Math.max(
          ...grid.groups.flatMap((g) => g.labels.map((l) => ctx.measureText(l).width)),
          0,
        );
        labelPx = Math.round(Math.min(LABEL_MAX_PX, Math.max(LABEL_MIN_PX, widest + 16)));
      }
    }
    layout = gridLayout(grid, collapsed);
    sizer.style.width = `${labelPx + layout.columns * PITCH_PX}px`;
    sizer.style.height = `${HEADER_PX + layout.height}px`;
    const vw = scroll.clientWidth;
    const vh = scroll.clientHeight;
    Object.assign(view, { width: vw, height: vh, left: scroll.scrollLeft, top: scroll.scrollTop });
    if (canvas.width !== vw || canvas.height !== vh) {
      canvas.width = vw;
      canvas.height = vh;
      canvas.style.width = `${vw}px`;
      canvas.style.height = `${vh}px`;
    }
    const ctx = canvas.getContext("2d");
    let drawn = 0;
    if (ctx && vw > 0 && vh > 0) {
      drawn = paintCells(ctx, grid, vw, vh);
      paintText(ctx, grid, vw, vh);
    }
    canvas.setAttribute(
      "aria-label",
      `layer × step grid: ${layout.rows} layers in ${grid.groups.length} blocks × ` +
        `${layout.columns} steps; click a cell to show it`,
    );
    const token = model.get("token");
    const tokenText = model.get("tokens")[token] ?? "?";
    caption.textContent = gridCaption(grid, tokenText, model.get("attention_head"));
    const held = !grid.per_token || grid.tokens.includes(token);
    box.dataset.source = grid.source;
    box.dataset.rows = String(layout.rows);
    box.dataset.columns = String(layout.columns);
    box.dataset.groups = String(grid.groups.length);
    box.dataset.token = String(held ? token : -1);
    box.dataset.drawnCells = String(drawn);
    box.dataset.drawMs = (performance.now() - started).toFixed(3);
    // Geometry for tests and tools: where each layer row starts (content y, -1 when folded).
    box.dataset.labelPx = String(labelPx);
    box.dataset.headerPx = String(HEADER_PX);
    box.dataset.pitchPx = String(PITCH_PX);
    const tops = new Array<number>(layout.rows).fill(-1);
    for (const line of layout.lines) if (line.kind === "row") tops[line.row] = line.y;
    box.dataset.rowTops = tops.join(",");
    highlight();
  };

  const soon = (): void => {
    if (!frame) frame = requestAnimationFrame(draw);
  };

  const hitAt = (event: MouseEvent): GridHit => {
    if (!layout) return null;
    const rect = scroll.getBoundingClientRect();
    const vx = event.clientX - rect.left;
    const vy = event.clientY - rect.top;
    if (vy < HEADER_PX) return null;
    const y = vy - HEADER_PX + scroll.scrollTop;
    const hit = hitTest(layout, Math.max(0, vx - labelPx) + scroll.scrollLeft, y);
    // Labels select nothing but fold groups; cells need the pointer right of the labels.
    if (hit?.kind === "cell" && vx < labelPx) return null;
    return hit;
  };

  const onClick = (event: MouseEvent): void => {
    const grid = model.get("grid_data");
    const hit = hitAt(event);
    if (!grid || !hit) return;
    if (hit.kind === "group") {
      if (collapsed.has(hit.group)) collapsed.delete(hit.group);
      else collapsed.add(hit.group);
      draw();
      return;
    }
    const group = grid.groups[hit.line.group] as GridGroup;
    const layer = group.layers[hit.line.index] as string;
    selectCell(model, grid.source, layer, grid.steps[hit.column] as number);
  };

  const onMove = (event: MouseEvent): void => {
    const grid = model.get("grid_data");
    const hit = hitAt(event);
    if (!grid || hit?.kind !== "cell") {
      hover.textContent = "";
      return;
    }
    const group = grid.groups[hit.line.group] as GridGroup;
    hover.textContent = cellHoverText(grid, group, hit.line.index, hit.column);
  };

  scroll.addEventListener("click", onClick);
  scroll.addEventListener("mousemove", onMove);
  scroll.addEventListener("scroll", soon, { passive: true });
  const resize = typeof ResizeObserver === "undefined" ? null : new ResizeObserver(soon);
  resize?.observe(scroll);
  const offDraw = onChanges(
    model,
    ["grid", "grid_data", "token", "tokens", "attention_head"],
    draw,
  );
  const offHighlight = onChanges(
    model,
    ["step", "overlay", "attention_layer", "saliency_layer"],
    highlight,
  );
  draw();
  return () => {
    offDraw();
    offHighlight();
    if (frame) cancelAnimationFrame(frame);
    resize?.disconnect();
    scroll.removeEventListener("click", onClick);
    scroll.removeEventListener("mousemove", onMove);
    scroll.removeEventListener("scroll", soon);
    box.remove();
  };
}
