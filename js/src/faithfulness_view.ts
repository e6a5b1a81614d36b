import { overlayName, requestAction, shownStep } from "./actions";
import { checkPayload, faithfulnessFor, float32Of } from "./data";
import { type Cleanup, h, type Model, onChanges, setSafeAttribute } from "./model";
import { formatValue } from "./scale_view";
import type { FaithfulnessEntry } from "./schema";

const SVG = "http://www.w3.org/2000/svg";
const W = 300;
const H = 120;
const BOX = { left: 34, right: 290, top: 8, bottom: 96 } as const;
/** The four curves of an entry, in the order of `FaithfulnessEntry.curves`. */
export const FAITH_CURVES = [
  { name: "deletion", cls: "dw-faith-deletion" },
  { name: "insertion", cls: "dw-faith-insertion" },
  { name: "random deletion", cls: "dw-faith-deletion dw-faith-random" },
  { name: "random insertion", cls: "dw-faith-insertion dw-faith-random" },
] as const;

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

/** The sentence with the AUCs beside the random baseline, and which way is better. */
export function aucText(entry: FaithfulnessEntry): string {
  const sd = (v: number): string => (Number.isFinite(v) ? ` ± ${formatValue(v)}` : "");
  return (
    `deletion AUC ${formatValue(entry.deletion_auc)} vs random ` +
    `${formatValue(entry.random_deletion_auc)}${sd(entry.random_deletion_sd)} (lower is better); ` +
    `insertion AUC ${formatValue(entry.insertion_auc)} vs random ` +
    `${formatValue(entry.random_insertion_auc)}${sd(entry.random_insertion_sd)} (higher is better)`
  );
}

/** Insertion/deletion curves and AUC of the map shown, beside random orders; on request. */
export function faithfulnessView(model: Model, el: HTMLElement): Cleanup {
  const box = h("figure", "dw-faith");
  box.setAttribute("aria-label", "faithfulness");
  const head = h("div", "dw-faith-head");
  const title = h("span", "dw-faith-title", "faithfulness");
  const button = h("button", "dw-faith-compute", "check this map");
  button.type = "button";
  button.title = "Insertion/deletion curves of the map shown, beside random orders";
  button.setAttribute("aria-label", "compute faithfulness of the map shown");
  head.append(title, button);
  const plot = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "dw-faith-plot", role: "img" });
  const numbers = h("p", "dw-faith-auc");
  const operator = h("p", "dw-faith-operator");
  box.append(head, plot, numbers, operator);
  el.appendChild(box);

  const draw = (entry: FaithfulnessEntry): void => {
    plot.replaceChildren();
    const x = float32Of(entry.fractions);
    const curves = float32Of(entry.curves);
    const n = x.length;
    let lo = 0;
    let hi = 1;
    for (const v of curves) {
      if (Number.isFinite(v)) {
        lo = Math.min(lo, v);
        hi = Math.max(hi, v);
      }
    }
    const px = (f: number): number => BOX.left + f * (BOX.right - BOX.left);
    const py = (v: number): number =>
      BOX.bottom - ((v - lo) / (hi - lo || 1)) * (BOX.bottom - BOX.top);
    const axes = svg("g", { class: "dw-axes" });
    axes.appendChild(
      svg("line", { x1: `${BOX.left}`, x2: `${BOX.left}`, y1: `${BOX.top}`, y2: `${BOX.bottom}` }),
    );
    axes.appendChild(
      svg("line", {
        x1: `${BOX.left}`,
        x2: `${BOX.right}`,
        y1: `${BOX.bottom}`,
        y2: `${BOX.bottom}`,
      }),
    );
    for (const f of [0, 0.5, 1]) {
      axes.appendChild(
        svg(
          "text",
          { x: px(f).toFixed(1), y: `${BOX.bottom + 11}`, class: "dw-tick dw-xtick" },
          String(f),
        ),
      );
    }
    for (const v of [lo, (lo + hi) / 2, hi]) {
      axes.appendChild(
        svg(
          "text",
          { x: `${BOX.left - 4}`, y: py(v).toFixed(1), class: "dw-tick dw-ytick" },
          formatValue(v),
        ),
      );
    }
    axes.appendChild(
      svg(
        "text",
        { x: `${BOX.right}`, y: `${H - 2}`, class: "dw-axis-label" },
        "share of latent cells perturbed",
      ),
    );
    plot.appendChild(axes);
    FAITH_CURVES.forEach(({ name, cls }, k) => {
      const points: string[] = [];
      for (let i = 0; i < n; i++) {
        const v = curves[k * n + i] as number;
        if (Number.isFinite(v)) points.push(`${px(x[i] as number).toFixed(1)},${py(v).toFixed(1)}`);
      }
      const line = svg("polyline", {
        points: points.join(" "),
        class: `dw-faith-line ${cls}`,
        "data-name": name,
      });
      line.appendChild(svg("title", {}, name));
      plot.appendChild(line);
    });
    // Direct labels at the right end of the map's own curves.
    for (const [k, name] of [
      [0, "deletion"],
      [1, "insertion"],
    ] as const) {
      const v = curves[k * n + n - 1] as number;
      plot.appendChild(
        svg(
          "text",
          {
            x: `${BOX.right - 2}`,
            y: (py(v) - 3).toFixed(1),
            class: `dw-faith-label ${FAITH_CURVES[k].cls}`,
          },
          name,
        ),
      );
    }
    plot.setAttribute(
      "aria-label",
      `insertion and deletion curves (solid) beside random orders (dashed); ${aucText(entry)}`,
    );
  };

  const update = (): void => {
    const overlay = model.get("overlay");
    const entry = faithfulnessFor({
      faithfulness: model.get("faithfulness"),
      overlay,
      step: shownStep(model),
      token: model.get("token"),
      attention_layer: model.get("attention_layer"),
      attention_head: model.get("attention_head"),
      saliency_layer: model.get("saliency_layer"),
    });
    const canCompute = model.get("actions").includes("faithfulness");
    // Insertion/deletion judges a map of the prediction; a concept map is of a word.
    box.hidden = overlay === "none" || overlay === "concept" || (!entry && !canCompute);
    button.hidden = !canCompute || entry !== null;
    button.disabled = model.get("status") === "running";
    plot.style.display = entry ? "" : "none";
    box.dataset.computed = String(entry !== null);
    if (!entry || checkPayload(entry.curves) || checkPayload(entry.fractions)) {
      title.textContent = "faithfulness";
      numbers.textContent = `Not computed for ${overlayName(overlay)} at this step.`;
      operator.textContent = "";
      return;
    }
    draw(entry);
    title.textContent = `faithfulness (y: ${entry.similarity} of the one-step prediction to the unperturbed one)`;
    numbers.textContent = aucText(entry);
    operator.textContent = `Operator “${entry.operator}”: ${entry.operator_text}. ${entry.description}`;
    box.dataset.deletionAuc = String(entry.deletion_auc);
    box.dataset.randomDeletionAuc = String(entry.random_deletion_auc);
    box.dataset.operator = entry.operator;
  };
  const onClick = (): void => requestAction(model, "faithfulness");
  button.addEventListener("click", onClick);
  const off = onChanges(
    model,
    [
      "faithfulness",
      "overlay",
      "step",
      "token",
      "attention_layer",
      "attention_head",
      "saliency_layer",
      "actions",
      "status",
    ],
    update,
  );
  update();
  return () => {
    off();
    button.removeEventListener("click", onClick);
    box.remove();
  };
}
