"""The explorer's layout at any width: panels wrap instead of overlapping the image.

Every panel is populated (colour scale, caption, controls, token chips, curves, faithfulness,
layer × step grid, slider) and the explorer is measured with the element boxes chromium
reports, in the standalone export at several viewport widths and in JupyterLab inside
ipywidgets boxes (two explorers side by side, fixed-width boxes).
"""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np
import pytest

from bench.browserlib import run_all_cells, write_notebook
from diffwidget.explain.results import FaithfulnessCurves, FaithfulnessResult, SaliencyMap
from diffwidget.testing.synthetic import synthetic_trace
from diffwidget.widget.explorer import Explorer
from tests.browser.test_browser_explorer import SETUP

pytestmark = pytest.mark.browser

#: Viewport widths of the export (px): wide, the old overlap threshold, half a notebook, phones.
EXPORT_WIDTHS = (1400, 730, 520, 360, 320)
#: Widths (px) of the ipywidgets boxes the explorer is shown in inside JupyterLab.
BOX_WIDTHS = (320, 360, 540)
#: Step with a DF-RISE map and a faithfulness result.
STEP = 4
#: Tolerance of the box comparisons (CSS px): sub-pixel rounding.
EPS = 0.5

#: What is wrong with the layout of one explorer root (``[]`` when nothing is), and its boxes.
LAYOUT = f"""(root) => {{
    const eps = {EPS};
    const rect = (el) => el.getBoundingClientRect();
    const shown = (el) => {{
        const r = rect(el);
        return r.width > 0 && r.height > 0 && getComputedStyle(el).visibility !== 'hidden';
    }};
    const overlap = (a, b) => Math.min(a.right, b.right) - Math.max(a.left, b.left) > eps
        && Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top) > eps;
    const name = (el) => el.getAttribute('aria-label') || el.className || el.tagName;
    const problems = [];
    const r = rect(root);
    const canvas = root.querySelector('.dw-canvas');
    const c = rect(canvas);
    if (Math.abs(c.width - c.height) > 1) problems.push(`image is ${{c.width}}x${{c.height}}`);
    if (c.width < 100) problems.push(`image shrank to ${{c.width}} px`);
    const outer = root.closest('.widget-box');
    const limit = outer ? rect(outer).right : document.documentElement.clientWidth;
    if (r.right > limit + eps) problems.push(`root ends at ${{r.right}}, past ${{limit}}`);
    if (root.scrollWidth > root.clientWidth + 1) {{
        problems.push(`content overflows the root: ${{root.scrollWidth}} > ${{root.clientWidth}}`);
    }}
    const parts = '.dw-scale, .dw-prompt, .dw-controls, .dw-tokens, .dw-curves, .dw-panel, '
        + '.dw-scale-meaning, .dw-caption, .dw-faith, .dw-grid, .dw-slider, .dw-status, '
        + 'button, select, input, label';
    const blocks = [...root.children].filter(shown);
    const inside = (a, b) => a.left >= b.left - eps && a.right <= b.right + eps
        && a.top >= b.top - eps && a.bottom <= b.bottom + eps;
    for (const el of [canvas, ...root.querySelectorAll(parts)]) {{
        if (!shown(el)) continue;
        const b = rect(el);
        if (el !== canvas && overlap(b, c)) problems.push(`${{name(el)}} overlaps the image`);
        const block = blocks.find((k) => k.contains(el));
        if (block && !inside(b, rect(block))) {{
            problems.push(`${{name(el)}} sticks out of ${{name(block)}}`);
        }}
        if (b.left < r.left - eps || b.right > r.right + eps) {{
            problems.push(`${{name(el)}} spans ${{b.left}}..${{b.right}} (root ${{r.width}} wide)`);
        }}
    }}
    for (let i = 0; i < blocks.length; i++) for (let j = i + 1; j < blocks.length; j++) {{
        if (overlap(rect(blocks[i]), rect(blocks[j]))) {{
            problems.push(`${{name(blocks[i])}} overlaps ${{name(blocks[j])}}`);
        }}
    }}
    const right = rect(root.querySelector('.dw-right'));
    return {{problems, root: r.width, image: c.width,
             beside: right.left >= c.right && right.top < c.bottom}};
}}"""


class _FakeEvaluator:
    """Insertion/deletion stand-in: straight curves, without a pipeline."""

    def evaluate(
        self, pipe: Any, trace: Any, step: int, saliency: Any, progress: Any = None
    ) -> FaithfulnessResult:
        frac = np.linspace(0, 1, 9, dtype=np.float32)

        def curves(deletion: np.ndarray, insertion: np.ndarray) -> FaithfulnessCurves:
            auc = (float(np.trapezoid(deletion, frac)), float(np.trapezoid(insertion, frac)))
            return FaithfulnessCurves(frac, deletion, insertion, *auc)

        meta = {"operator": "renoise", "operator_text": "fresh noise at the step's level",
                "similarity": "ssim", "n_random": 3, "random_deletion_auc_sd": 0.01,
                "random_insertion_auc_sd": 0.01}  # fmt: skip
        return FaithfulnessResult(
            step, curves(1 - frac, frac), curves(1 - 0.5 * frac, 0.5 + 0.5 * frac), meta
        )


def populated_export(path: Any) -> Any:
    """An exported explorer with every panel shown: DF-RISE map, curve, faithfulness, grid."""
    explorer = Explorer(synthetic_trace(), faithfulness=_FakeEvaluator())
    value = np.zeros((16, 16), dtype=np.float32)
    value[4:12, 2:8] = 1.0
    explorer.add_overlay("df_rise", STEP, SaliencyMap("df_rise", STEP, 0, value, value, {}, {}))
    explorer.step = STEP
    explorer.overlay = "df_rise"
    explorer.add_curve("red", np.linspace(0.5, 1.0, 20))
    explorer.faithfulness(STEP).result(timeout=60)
    explorer.grid = "attention"
    out = explorer.to_html(path)
    explorer.close()
    return out


def test_export_lays_out_without_overlap_at_every_width(chromium, tmp_path):
    path = populated_export(tmp_path / "explorer.html")
    for width in EXPORT_WIDTHS:
        context = chromium.new_context(viewport={"width": width, "height": 900})
        page = context.new_page()
        page.goto(path.as_uri())
        page.wait_for_selector('figure.dw-faith[data-computed="true"]')
        page.wait_for_selector(".dw-grid:not([hidden])")
        layout = page.locator(".dw-root").evaluate(LAYOUT)
        assert page.evaluate("document.documentElement.scrollWidth") <= width, width
        context.close()
        assert layout["problems"] == [], (width, layout)
        if width >= 1400:  # room for the controls beside the image
            assert layout["beside"], layout
            assert layout["image"] == pytest.approx(384, abs=1)


#: Kernel cells: the populated explorer of the other browser tests, side by side with a
#: second one as the comparison notebooks show them, then in fixed-width boxes.
LAB_CELLS = [
    "NAME = 'layout'\n" + SETUP,
    textwrap.dedent(
        f"""
        import ipywidgets as widgets
        explorer.compute("df_rise", {STEP}).result(timeout=120)
        explorer.step = {STEP}
        explorer.overlay = "df_rise"
        explorer.faithfulness().result(timeout=120)
        explorer.add_curve("red", np.linspace(0.5, 1.0, 20))
        explorer.grid = "attention"
        twin = Explorer(explorer.trace)
        twin.overlay = "attention"
        twin.grid = "attention"
        """
    ),
    "widgets.HBox([widgets.VBox([widgets.HTML('<b>A</b>'), explorer.widget]),\n"
    "              widgets.VBox([widgets.HTML('<b>B</b>'), twin.widget])])",
    *(f"widgets.Box([explorer.widget], layout=widgets.Layout(width='{w}px'))" for w in BOX_WIDTHS),
]


def test_lab_explorers_side_by_side_and_in_narrow_boxes(jupyter_server, page):
    browser_page, console = page
    trace_path = jupyter_server.root / "trace.safetensors"
    if not trace_path.exists():
        synthetic_trace().save(trace_path)
    write_notebook(jupyter_server.root / "layout.ipynb", LAB_CELLS)
    browser_page.goto(jupyter_server.page_url("lab/tree/layout.ipynb"))
    run_all_cells(browser_page)
    count = 2 + len(BOX_WIDTHS)
    browser_page.wait_for_function(
        f"() => document.querySelectorAll('figure.dw-faith[data-computed=\"true\"]').length"
        f" === {count - 1}"
    )
    roots = browser_page.locator(".dw-root")
    assert roots.count() == count
    for index in range(count):
        roots.nth(index).scroll_into_view_if_needed()
        layout = roots.nth(index).evaluate(LAYOUT)
        assert layout["problems"] == [], (index, layout)
    # The fixed-width boxes hold the explorer within their width.
    widths = [roots.nth(2 + k).evaluate("r => r.getBoundingClientRect().width") for k in range(3)]
    assert all(w <= box + EPS for w, box in zip(widths, BOX_WIDTHS, strict=True)), widths
    assert console.widget_errors() == []
