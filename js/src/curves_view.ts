import { setStep, shownStep, tokenVisible } from "./actions";
import { checkPayload, float32Of } from "./data";
import { type Cleanup, h, type Model, onChanges, setSafeAttribute } from "./model";
import { formatValue } from "./scale_view";
import {
  COMMITTED_LEVEL,
  CURVE_GROUP_TITLES,
  CURVE_GROUP_UNITS,
  CURVE_GROUPS,
  CURVE_PALETTE,
  type CurveGroup,
  type CurveSeries,
} from "./schema";

const SVG = "http://www.w3.org/2000/svg";
/** Panel size in SVG user units (the SVG keeps this aspect ratio at any width). */
export const PANEL_W = 360;
export const PANEL_H = 120;
/** Plot area inside the panel: room for the y ticks (left), x ticks (bottom), labels (right). */
export const PLOT = { left: 40, right: 300, top: 8, bottom: 96 } as const;
/** Smallest vertical gap between two direct labels (SVG units). */
const LABEL_GAP = 10;

/** x coordinate of `step` in a panel. */
export function xOf(step: number, n: number): number {
  return PLOT.left + (n <= 1 ? 0 : (step / (n - 1)) * (PLOT.right - PLOT.left));
}

/** y coordinate of `value` in a panel whose axis runs from `lo` to `hi`. */
export function yOf(value: number, lo: number, hi: number): number {
  const span = hi - lo || 1;
  return PLOT.bottom - ((value - lo) / span) * (PLOT.bottom - PLOT.top);
}

/** The step nearest to panel x coordinate `x`. */
export function stepFromX(x: number, n: number): number {
  if (n <= 1) return 0;
  const f = (x - PLOT.left) / (PLOT.right - PLOT.left);
  return Math.min(n - 1, Math.max(0, Math.round(f * (n - 1))));
}

/** SVG polyline points for `values`, skipping NaN (not computed) steps. */
export function polylinePoints(values: ArrayLike<number>, lo: number, hi: number): string {
  const n = values.length;
  const points: string[] = [];
  for (let i = 0; i < n; i++) {
    const v = values[i] as number;
    if (Number.isNaN(v)) continue;
    points.push(`${xOf(i, n).toFixed(1)},${yOf(v, lo, hi).toFixed(1)}`);
  }
  return points.join(" ");
}

/** Groups whose curves get a marker where they reach COMMITTED_LEVEL for good. */
export const CROSSING_GROUPS: readonly CurveGroup[] = ["concept_auc", "commitment"];

/**
 * The first step from which `values` is at least `level` at every computed step (NaN: not
 * computed, skipped); null when the last computed value is below it or nothing is computed.
 */
export function crossingStep(values: ArrayLike<number>, level: number): number | null {
  let crossing: number | null = null;
  for (let i = 0; i < values.length; i++) {
    const v = values[i] as number;
    if (Number.isNaN(v)) continue;
    if (v < level) crossing = null;
    else if (crossing === null) crossing = i;
  }
  return crossing;
}

/** `count` evenly spaced tick values from `lo` to `hi` (inclusive). */
export function ticks(lo: number, hi: number, count: number): number[] {
  if (count < 2 || hi === lo) return [lo];
  return Array.from({ length: count }, (_, i) => lo + ((hi - lo) * i) / (count - 1));
}

/** Integer step ticks: first, last and a few between. */
export function stepTicks(n: number, count = 5): number[] {
  if (n <= 1) return [0];
  const out = new Set<number>();
  for (let i = 0; i < count; i++) out.add(Math.round(((n - 1) * i) / (count - 1)));
  return [...out].sort((a, b) => a - b);
}

/** y positions for labels at the curves' ends, pushed apart so none overlap. */
export function spreadLabels(ends: number[], gap = LABEL_GAP): number[] {
  const order = ends.map((y, i) => ({ y, i })).sort((a, b) => b.y - a.y);
  const placed = [...ends];
  for (let k = 1; k < order.length; k++) {
    const above = order[k - 1] as { y: number; i: number };
    const here = order[k] as { y: number; i: number };
    // SVG y grows downwards: each next label must sit at least `gap` below the previous.
    placed[here.i] = Math.min(placed[here.i] as number, (placed[above.i] as number) - gap);
  }
  const lowest = Math.min(...placed);
  if (lowest < PLOT.top) {
    for (let i = 0; i < placed.length; i++) placed[i] = (placed[i] as number) + PLOT.top - lowest;
  }
  return placed;
}

function svg<K extends keyof SVGElementTagNameMap>(
  tag: K,
  attrs: Record<string, string>,
  text?: string,
): SVGElementTagNameMap[K] {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) setSafeAttribute(node, k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

interface Member {
  series: CurveSeries;
  row: number;
  label: string;
}

/** Visible members of a group; repeated words get their position ("a (1)", "a (5)"). */
export function groupMembers(
  series: CurveSeries[],
  group: CurveGroup,
  kinds: string[],
  showSpecial: boolean,
): Member[] {
  const members = series
    .map((s, row) => ({ series: s, row, label: s.name }))
    .filter(({ series: s }) => s.group === group)
    .filter(
      ({ series: s }) => s.token === null || tokenVisible(kinds[s.token] ?? "word", showSpecial),
    );
  const counts = new Map<string, number>();
  for (const m of members) counts.set(m.label, (counts.get(m.label) ?? 0) + 1);
  for (const m of members) {
    if ((counts.get(m.label) ?? 0) > 1 && m.series.token !== null) {
      m.label = `${m.label} (${m.series.token})`;
    }
  }
  return members;
}

/** The COMMITTED_LEVEL line and a dashed mark (labelled with its step) at each crossing. */
function crossingMarks(
  members: Member[],
  rows: Float32Array[],
  n: number,
  lo: number,
  hi: number,
): SVGGElement {
  const marks = svg("g", { class: "dw-crossings" });
  const level = yOf(COMMITTED_LEVEL, lo, hi).toFixed(1);
  marks.appendChild(
    svg("line", {
      x1: `${PLOT.left}`,
      x2: `${PLOT.right}`,
      y1: level,
      y2: level,
      class: "dw-level",
    }),
  );
  members.forEach(({ label }, k) => {
    const step = crossingStep(rows[k] as Float32Array, COMMITTED_LEVEL);
    if (step === null) return;
    const colour = CURVE_PALETTE[k % CURVE_PALETTE.length] as string;
    const x = xOf(step, n).toFixed(1);
    const mark = svg("line", {
      x1: x,
      x2: x,
      y1: `${PLOT.top}`,
      y2: `${PLOT.bottom}`,
      class: "dw-crossing",
      stroke: colour,
      "data-step": String(step),
    });
    mark.appendChild(
      svg("title", {}, `${label} reaches ${COMMITTED_LEVEL} at step ${step} and stays`),
    );
    marks.appendChild(mark);
    // Stacked labels: two curves crossing at the same step stay readable.
    const y = (PLOT.top + k * 8).toFixed(1);
    marks.appendChild(
      svg(
        "text",
        { x: `${Number(x) + 2}`, y, class: "dw-crossing-label", fill: colour },
        `${step}`,
      ),
    );
  });
  return marks;
}

/** Curves over steps, one panel per group: axes, direct labels, hover values, step cursor. */
export function curvesView(model: Model, el: HTMLElement): Cleanup {
  const box = h("div", "dw-curves");
  el.appendChild(box);
  let cursors: SVGLineElement[] = [];

  const moveCursors = (): void => {
    const n = model.get("timesteps").length;
    const x = xOf(shownStep(model), n).toFixed(1);
    for (const line of cursors) {
      line.setAttribute("x1", x);
      line.setAttribute("x2", x);
    }
  };

  const build = (): void => {
    box.replaceChildren();
    cursors = [];
    const curves = model.get("curves");
    // Without its buffer (not arrived yet, or lost: the base64 fallback resends it) there
    // is nothing to draw.
    if (!curves || checkPayload(curves.values)) return;
    const values = float32Of(curves.values);
    const n = curves.values.shape[1] ?? 0;
    const kinds = model.get("token_kinds");
    for (const group of CURVE_GROUPS) {
      const members = groupMembers(curves.series, group, kinds, model.get("show_special"));
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
      if (hi === lo) hi = lo + 1e-3;
      box.appendChild(panel(group, members, rows, n, lo, hi));
    }
    moveCursors();
  };

  const panel = (
    group: CurveGroup,
    members: Member[],
    rows: Float32Array[],
    n: number,
    lo: number,
    hi: number,
  ): HTMLElement => {
    const div = h("figure", "dw-panel");
    div.setAttribute("aria-label", `curves: ${CURVE_GROUP_TITLES[group]}`);
    div.appendChild(
      h(
        "figcaption",
        "dw-panel-title",
        `${CURVE_GROUP_TITLES[group]} (${CURVE_GROUP_UNITS[group]})`,
      ),
    );
    const plot = svg("svg", {
      viewBox: `0 0 ${PANEL_W} ${PANEL_H}`,
      class: "dw-plot",
      "data-group": group,
      role: "img",
      "aria-label": `${CURVE_GROUP_TITLES[group]} over steps; click to move to a step`,
    });
    const axes = svg("g", { class: "dw-axes" });
    axes.appendChild(
      svg("line", {
        x1: `${PLOT.left}`,
        x2: `${PLOT.left}`,
        y1: `${PLOT.top}`,
        y2: `${PLOT.bottom}`,
      }),
    );
    axes.appendChild(
      svg("line", {
        x1: `${PLOT.left}`,
        x2: `${PLOT.right}`,
        y1: `${PLOT.bottom}`,
        y2: `${PLOT.bottom}`,
      }),
    );
    for (const v of ticks(lo, hi, 3)) {
      const y = yOf(v, lo, hi).toFixed(1);
      axes.appendChild(svg("line", { x1: `${PLOT.left - 3}`, x2: `${PLOT.left}`, y1: y, y2: y }));
      axes.appendChild(
        svg("text", { x: `${PLOT.left - 5}`, y, class: "dw-tick dw-ytick" }, formatValue(v)),
      );
    }
    for (const s of stepTicks(n)) {
      const x = xOf(s, n).toFixed(1);
      axes.appendChild(
        svg("line", { x1: x, x2: x, y1: `${PLOT.bottom}`, y2: `${PLOT.bottom + 3}` }),
      );
      axes.appendChild(
        svg("text", { x, y: `${PLOT.bottom + 12}`, class: "dw-tick dw-xtick" }, String(s)),
      );
    }
    axes.appendChild(
      svg("text", { x: `${PLOT.right}`, y: `${PANEL_H - 2}`, class: "dw-axis-label" }, "step"),
    );
    plot.appendChild(axes);
    const token = model.get("token");
    const ends: number[] = [];
    members.forEach(({ series, label }, k) => {
      const selected = series.token !== null && series.token === token;
      const colour = CURVE_PALETTE[k % CURVE_PALETTE.length] as string;
      const row = rows[k] as Float32Array;
      const line = svg("polyline", {
        points: polylinePoints(row, lo, hi),
        class: selected ? "dw-line dw-line-selected" : "dw-line",
        stroke: colour,
        "data-name": series.name,
      });
      line.appendChild(svg("title", {}, label));
      plot.appendChild(line);
      let last = row.length - 1;
      while (last > 0 && Number.isNaN(row[last] as number)) last--;
      ends.push(yOf(Number.isNaN(row[last] as number) ? lo : (row[last] as number), lo, hi));
    });
    if (CROSSING_GROUPS.includes(group)) plot.appendChild(crossingMarks(members, rows, n, lo, hi));
    spreadLabels(ends).forEach((y, k) => {
      const member = members[k] as Member;
      const selected = member.series.token !== null && member.series.token === token;
      plot.appendChild(
        svg(
          "text",
          {
            x: `${PLOT.right + 4}`,
            y: y.toFixed(1),
            class: selected ? "dw-label dw-label-selected" : "dw-label",
            fill: CURVE_PALETTE[k % CURVE_PALETTE.length] as string,
          },
          member.label,
        ),
      );
    });
    const hover = svg("line", { y1: `${PLOT.top}`, y2: `${PLOT.bottom}`, class: "dw-hover-line" });
    hover.style.display = "none";
    plot.appendChild(hover);
    const cursor = svg("line", { y1: `${PLOT.top}`, y2: `${PLOT.bottom}`, class: "dw-cursor" });
    plot.appendChild(cursor);
    cursors.push(cursor);
    const readout = h("div", "dw-hover");
    readout.setAttribute("aria-live", "polite");
    const stepAt = (event: MouseEvent): number => {
      const rect = plot.getBoundingClientRect();
      const x = ((event.clientX - rect.left) / Math.max(rect.width, 1)) * PANEL_W;
      return stepFromX(x, n);
    };
    plot.addEventListener("click", (event: MouseEvent) => setStep(model, stepAt(event)));
    plot.addEventListener("mousemove", (event: MouseEvent) => {
      const step = stepAt(event);
      const x = xOf(step, n).toFixed(1);
      hover.setAttribute("x1", x);
      hover.setAttribute("x2", x);
      hover.style.display = "";
      const parts = members.map(({ label }, k) => {
        const v = (rows[k] as Float32Array)[step] as number;
        return `${label} ${Number.isNaN(v) ? "–" : formatValue(v)}`;
      });
      readout.textContent = `step ${step}: ${parts.join(", ")}`;
    });
    plot.addEventListener("mouseleave", () => {
      hover.style.display = "none";
      readout.textContent = "";
    });
    div.append(plot, readout);
    return div;
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
