import { setStep, tokenVisible } from "./actions";
import { float32Of } from "./data";
import { type Cleanup, h, type Model, onChanges } from "./model";
import { CURVE_GROUPS, type CurveGroup } from "./schema";

const SVG = "http://www.w3.org/2000/svg";
/** Panel size in SVG user units (scaled to the container width). */
export const PANEL_W = 320;
export const PANEL_H = 80;
const PAD = 6;

const GROUP_TITLES: Record<CurveGroup, string> = {
  attention_mass: "attention mass per token",
  token_relevance: "token relevance (min–max over words)",
  concept_auc: "concept ROC-AUC",
  faithfulness: "faithfulness AUC",
};

/** x coordinate of `step` in a panel. */
export function xOf(step: number, n: number): number {
  return PAD + (n <= 1 ? 0 : (step / (n - 1)) * (PANEL_W - 2 * PAD));
}

/** The step nearest to panel x coordinate `x`. */
export function stepFromX(x: number, n: number): number {
  if (n <= 1) return 0;
  const f = (x - PAD) / (PANEL_W - 2 * PAD);
  return Math.min(n - 1, Math.max(0, Math.round(f * (n - 1))));
}

/** SVG polyline points for `values`, skipping NaN (not computed) steps. */
export function polylinePoints(values: ArrayLike<number>, lo: number, hi: number): string {
  const n = values.length;
  const span = hi - lo || 1;
  const points: string[] = [];
  for (let i = 0; i < n; i++) {
    const v = values[i] as number;
    if (Number.isNaN(v)) continue;
    const y = PANEL_H - PAD - ((v - lo) / span) * (PANEL_H - 2 * PAD);
    points.push(`${xOf(i, n).toFixed(1)},${y.toFixed(1)}`);
  }
  return points.join(" ");
}

function svg<K extends keyof SVGElementTagNameMap>(
  tag: K,
  attrs: Record<string, string>,
): SVGElementTagNameMap[K] {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

/** Curves over steps, one panel per group, with a cursor at the step; click to jump. */
export function curvesView(model: Model, el: HTMLElement): Cleanup {
  const box = h("div", "dw-curves");
  el.appendChild(box);
  let cursors: SVGLineElement[] = [];

  const moveCursors = (): void => {
    const n = model.get("timesteps").length;
    const x = xOf(model.get("step"), n).toFixed(1);
    for (const line of cursors) {
      line.setAttribute("x1", x);
      line.setAttribute("x2", x);
    }
  };

  const build = (): void => {
    box.replaceChildren();
    cursors = [];
    const curves = model.get("curves");
    if (!curves) return;
    const values = float32Of(curves.values);
    const n = curves.values.shape[1] ?? 0;
    const kinds = model.get("token_kinds");
    const show = model.get("show_special");
    for (const group of CURVE_GROUPS) {
      const members = curves.series
        .map((series, row) => ({ series, row }))
        .filter(({ series }) => series.group === group)
        .filter(
          ({ series }) =>
            series.token === null || tokenVisible(kinds[series.token] ?? "word", show),
        );
      if (members.length === 0) continue;
      const rows = members.map(({ row }) => values.subarray(row * n, (row + 1) * n));
      // Attention mass: fit the visible curves (shares are small and close together);
      // AUC-type curves keep their natural [0, 1] range.
      const fit = group === "attention_mass";
      let lo = fit ? Number.POSITIVE_INFINITY : 0;
      let hi = fit ? Number.NEGATIVE_INFINITY : 1;
      for (const r of rows) {
        for (const v of r) {
          if (Number.isNaN(v)) continue;
          lo = Math.min(lo, v);
          hi = Math.max(hi, v);
        }
      }
      if (!Number.isFinite(lo)) [lo, hi] = [0, 1];
      const panel = h("div", "dw-panel");
      panel.appendChild(h("div", "dw-panel-title", GROUP_TITLES[group]));
      const plot = svg("svg", {
        viewBox: `0 0 ${PANEL_W} ${PANEL_H}`,
        class: "dw-plot",
        "data-group": group,
        preserveAspectRatio: "none",
      });
      members.forEach(({ series }, k) => {
        const selected = series.token !== null && series.token === model.get("token");
        const line = svg("polyline", {
          points: polylinePoints(rows[k] as Float32Array, lo, hi),
          class: selected ? "dw-line dw-line-selected" : "dw-line",
          "data-name": series.name,
        });
        const title = svg("title", {});
        title.textContent = series.name;
        line.appendChild(title);
        plot.appendChild(line);
      });
      const cursor = svg("line", { y1: "0", y2: String(PANEL_H), class: "dw-cursor" });
      plot.appendChild(cursor);
      cursors.push(cursor);
      plot.addEventListener("click", (event: MouseEvent) => {
        const rect = plot.getBoundingClientRect();
        const x = ((event.clientX - rect.left) / Math.max(rect.width, 1)) * PANEL_W;
        setStep(model, stepFromX(x, n));
      });
      panel.appendChild(plot);
      box.appendChild(panel);
    }
    moveCursors();
  };
  const offBuild = onChanges(model, ["curves", "token", "show_special", "token_kinds"], build);
  const offMove = onChanges(model, ["step", "timesteps"], moveCursors);
  build();
  return () => {
    offBuild();
    offMove();
    box.remove();
  };
}
