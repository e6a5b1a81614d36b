import { selectGridCell, shownStep } from "./actions";
import { buildLut, colourise } from "./colormap";
import { gridCell } from "./data";
import { type Cleanup, h, type Model, onChanges } from "./model";
import type { GridData } from "./schema";

/** CSS pixels per grid cell (the canvas is drawn at this size, maps interpolated into it). */
export const CELL_PX = 26;
/** Gap between cells (CSS pixels). */
export const GAP_PX = 2;

/** The (row, column) of the cell under canvas coordinates (x, y), or null on a gap/outside. */
export function cellAt(
  x: number,
  y: number,
  rows: number,
  columns: number,
): [number, number] | null {
  const pitch = CELL_PX + GAP_PX;
  const column = Math.floor(x / pitch);
  const row = Math.floor(y / pitch);
  if (row < 0 || row >= rows || column < 0 || column >= columns) return null;
  return [row, column];
}

/** Short row label of a module path. */
export function shortLayer(path: string): string {
  return path.replace(/\.transformer_blocks\.0\.attn2$/, "");
}

/** The caption above the grid: what the cells are and which filter applies. */
export function gridCaption(grid: GridData, token: string, head: number): string {
  let text = grid.description;
  if (grid.per_token) text += `; token “${token}”`;
  if (grid.source === "attention" && head >= 0) text += `; head ${head}`;
  return `${text}. Click a cell to show that layer at that step.`;
}

/** Small multiples of per-layer maps (rows) against steps (columns), paper Fig. 8. */
export function gridView(model: Model, el: HTMLElement): Cleanup {
  const box = h("figure", "dw-grid");
  box.setAttribute("aria-label", "layer × step grid");
  const caption = h("figcaption", "dw-grid-caption");
  const body = h("div", "dw-grid-body");
  const labels = h("div", "dw-grid-rows");
  const plot = h("div", "dw-grid-plot");
  const canvas = h("canvas", "dw-grid-canvas");
  canvas.setAttribute("role", "img");
  const column = h("div", "dw-grid-column");
  const row = h("div", "dw-grid-row");
  const steps = h("div", "dw-grid-steps");
  plot.append(canvas, column, row, steps);
  body.append(labels, plot);
  box.append(caption, body);
  el.appendChild(box);
  const lut = buildLut();
  const scratch = document.createElement("canvas");

  const selectedLayer = (grid: GridData): number => {
    const value =
      grid.source === "attention" ? model.get("attention_layer") : model.get("saliency_layer");
    return model.get("overlay") === grid.source ? grid.layers.indexOf(value) : -1;
  };

  const highlight = (): void => {
    const grid = model.get("grid_data");
    if (!grid) return;
    const pitch = CELL_PX + GAP_PX;
    const index = grid.steps.indexOf(shownStep(model));
    column.hidden = index < 0;
    column.style.left = `${index * pitch - 1}px`;
    column.style.height = `${grid.layers.length * pitch}px`;
    const layer = selectedLayer(grid);
    row.hidden = layer < 0;
    row.style.top = `${layer * pitch - 1}px`;
    row.style.width = `${grid.steps.length * pitch}px`;
    box.dataset.step = String(index >= 0 ? grid.steps[index] : -1);
  };

  const draw = (): void => {
    const grid = model.get("grid_data");
    box.hidden = !grid || grid.source !== model.get("grid");
    if (!grid || box.hidden) return;
    const rows = grid.layers.length;
    const columns = grid.steps.length;
    const pitch = CELL_PX + GAP_PX;
    canvas.width = columns * pitch;
    canvas.height = rows * pitch;
    canvas.style.width = `${canvas.width}px`;
    canvas.style.height = `${canvas.height}px`;
    canvas.setAttribute(
      "aria-label",
      `layer × step grid: ${rows} layers × ${columns} steps; click a cell to show it`,
    );
    const ctx = canvas.getContext("2d");
    const token = model.get("token");
    if (ctx) {
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      ctx.imageSmoothingEnabled = true;
      for (let r = 0; r < rows; r++) {
        for (let c = 0; c < columns; c++) {
          const cell = gridCell(grid, r, c, token);
          if (!cell) continue;
          scratch.width = cell.width;
          scratch.height = cell.height;
          const sctx = scratch.getContext("2d");
          if (!sctx) continue;
          const img = sctx.createImageData(cell.width, cell.height);
          colourise(cell.values, lut, 1, img.data);
          // Opaque cells: the grid shows the maps alone, dark where low.
          for (let i = 0; i < cell.values.length; i++) img.data[i * 4 + 3] = 255;
          sctx.putImageData(img, 0, 0);
          ctx.drawImage(scratch, c * pitch, r * pitch, CELL_PX, CELL_PX);
        }
      }
    }
    labels.replaceChildren();
    for (const name of grid.layers) {
      const label = h("div", "dw-grid-label", shortLayer(name));
      label.style.height = `${pitch}px`;
      label.title = name;
      labels.appendChild(label);
    }
    steps.replaceChildren();
    grid.steps.forEach((step, c) => {
      if (columns > 10 && c % 5 !== 0 && c !== columns - 1) return;
      const tick = h("span", "dw-grid-step", String(step));
      tick.style.left = `${c * pitch}px`;
      steps.appendChild(tick);
    });
    const tokenText = model.get("tokens")[token] ?? "?";
    caption.textContent = gridCaption(grid, tokenText, model.get("attention_head"));
    box.dataset.source = grid.source;
    box.dataset.rows = String(rows);
    box.dataset.columns = String(columns);
    highlight();
  };

  const onClick = (event: MouseEvent): void => {
    const grid = model.get("grid_data");
    if (!grid) return;
    const rect = canvas.getBoundingClientRect();
    const scale = canvas.width / Math.max(rect.width, 1);
    const hit = cellAt(
      (event.clientX - rect.left) * scale,
      (event.clientY - rect.top) * scale,
      grid.layers.length,
      grid.steps.length,
    );
    if (!hit) return;
    const [r, c] = hit;
    selectGridCell(model, grid.source, grid.layers[r] as string, grid.steps[c] as number);
  };
  canvas.addEventListener("click", onClick);
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
    canvas.removeEventListener("click", onClick);
    box.remove();
  };
}
