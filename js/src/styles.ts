/** Styles scoped under .dw-root; uses JupyterLab theme variables with fallbacks. */
export const STYLES = `
/* Panels wrap instead of overlapping: the image column (454px at most, the image shrinks
   with its aspect ratio kept) and the controls (260px at least) share a row when both fit;
   below that the controls go under the image. Then the faithfulness panel (454px at most)
   and the full-width rows: grid, slider, status, error. */
.dw-root { font: 13px/1.4 var(--jp-ui-font-family, system-ui, sans-serif);
  color: var(--jp-ui-font-color1, #222); display: flex; flex-wrap: wrap; gap: 8px;
  align-items: flex-start; outline: none; max-width: 980px; min-width: 0; }
.dw-root:focus-visible { box-shadow: 0 0 0 2px var(--jp-brand-color1, #1976d2); }
.dw-left, .dw-right { display: flex; flex-direction: column; gap: 6px; min-width: 0; }
.dw-left { flex: 0 1 454px; max-width: 100%; }
.dw-right { flex: 1 1 260px; }
.dw-bottom, .dw-slider, .dw-status, .dw-error { flex: 1 1 100%; min-width: 0; }
.dw-view { display: flex; gap: 6px; align-items: stretch; min-width: 0; }
.dw-prompt { font-weight: 600; }
/* A percentage width lets the canvas shrink (its min-content width is then 0). */
.dw-canvas { flex: 0 1 auto; width: 100%; max-width: 384px; min-width: 0; height: auto;
  aspect-ratio: 1 / 1; align-self: flex-start; border-radius: 4px; background: #111;
  image-rendering: auto; }
.dw-scale { margin: 0; display: grid; grid-template-rows: auto 1fr auto; flex: none; width: 64px;
  font-size: 11px; font-variant-numeric: tabular-nums; color: var(--jp-ui-font-color2, #555); }
.dw-scale[hidden] { display: none; }
.dw-scale-bar { width: 14px; border-radius: 2px; border: 1px solid #888;
  -webkit-mask-image: none; }
.dw-scale-meaning { margin: 0; max-width: 454px; font-size: 11px; color: var(--jp-ui-font-color2, #555); }
.dw-scale-meaning[hidden] { display: none; }
.dw-caption { margin: 0; max-width: 454px; font-size: 12px; color: var(--jp-ui-font-color2, #555); }
.dw-slider { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; }
.dw-track { flex: 1 1 120px; position: relative; }
.dw-range { width: 100%; margin: 0; }
.dw-marks { position: relative; height: 4px; }
.dw-mark { position: absolute; top: 0; width: 4px; height: 4px; margin-left: -2px;
  border-radius: 2px; background: #d4480f; }
.dw-step-label { font-variant-numeric: tabular-nums; min-width: 150px; }
.dw-controls, .dw-tokens { display: flex; flex-wrap: wrap; gap: 4px; align-items: center; }
.dw-controls select[hidden], .dw-controls button[hidden], .dw-controls form[hidden] { display: none; }
.dw-concept { display: inline-flex; gap: 2px; }
.dw-concept-word { width: 9em; }
.dw-controls select, .dw-controls label { max-width: 100%; }
.dw-layer { max-width: min(220px, 100%); }
.dw-grid-toggle.dw-active { background: var(--jp-brand-color1, #1976d2); color: #fff; }
.dw-chip { border: 1px solid #bbb; border-radius: 12px; padding: 1px 8px; background: transparent;
  color: inherit; cursor: pointer; max-width: 100%; overflow-wrap: anywhere; }
.dw-chip.dw-active { background: #f57d15; border-color: #f57d15; color: #fff; }
.dw-chip-start, .dw-chip-end, .dw-chip-pad { font-style: italic; opacity: 0.7; }
.dw-tokens-dimmed .dw-chip { opacity: 0.45; }
.dw-tokens-dimmed .dw-chip.dw-active { background: transparent; border-color: #f57d15; color: inherit; }
.dw-special { border: none; background: none; color: var(--jp-brand-color1, #1976d2); cursor: pointer; }
.dw-curves { display: flex; flex-direction: column; gap: 4px; }
.dw-panel { margin: 0; }
.dw-panel-title { font-size: 11px; color: var(--jp-ui-font-color2, #555); }
.dw-plot { width: 100%; height: auto; cursor: crosshair; background: var(--jp-layout-color2, #f4f4f4); }
.dw-axes line { stroke: #888; stroke-width: 1; vector-effect: non-scaling-stroke; }
.dw-tick, .dw-axis-label { font-size: 8px; fill: var(--jp-ui-font-color2, #555); }
.dw-ytick { text-anchor: end; dominant-baseline: middle; }
.dw-xtick { text-anchor: middle; }
.dw-axis-label { text-anchor: end; }
.dw-unit { text-anchor: start; dominant-baseline: hanging; }
.dw-line { fill: none; stroke-width: 1; opacity: 0.55; vector-effect: non-scaling-stroke; }
.dw-line-selected { stroke-width: 2.5; opacity: 1; }
.dw-label { font-size: 8px; dominant-baseline: middle; opacity: 0.75; }
.dw-label-selected { font-weight: 700; opacity: 1; }
.dw-cursor { stroke: #1976d2; stroke-width: 1.5; vector-effect: non-scaling-stroke; }
.dw-hover-line { stroke: #999; stroke-dasharray: 2 2; vector-effect: non-scaling-stroke; }
.dw-crossing { stroke-width: 1; stroke-dasharray: 3 2; vector-effect: non-scaling-stroke; }
.dw-crossing-label { font-size: 7px; text-anchor: start; dominant-baseline: hanging; }
.dw-level { stroke: #bbb; stroke-dasharray: 1 2; vector-effect: non-scaling-stroke; }
.dw-switch { margin: 0; font-size: 12px; }
.dw-switch[hidden], .dw-switch-form[hidden], .dw-filmstrip[hidden] { display: none; }
.dw-switch-form { display: inline-flex; flex-wrap: wrap; gap: 4px; align-items: center; }
.dw-switch-replacement { width: 8em; }
.dw-switch-seeds-label { display: inline-flex; gap: 3px; align-items: center; }
.dw-switch-seeds { width: 3.5em; }
.dw-switch-reason { font-size: 11px; color: var(--jp-ui-font-color2, #555); }
.dw-filmstrip { display: flex; gap: 3px; overflow-x: auto; padding: 3px 0; }
.dw-thumb { display: flex; flex-direction: column; align-items: center; padding: 1px;
  border: 2px solid transparent; background: none; cursor: pointer; font: inherit; }
.dw-thumb:disabled { cursor: default; }
.dw-thumb-current { border-color: #1976d2; }
.dw-thumb-canvas { width: 56px; height: auto; image-rendering: pixelated; }
.dw-thumb-label { font-size: 10px; white-space: nowrap; color: var(--jp-ui-font-color2, #555); }
.dw-switch-summary { font-size: 11px; color: var(--jp-ui-font-color2, #555);
  overflow-wrap: anywhere; }
.dw-hover { min-height: 16px; font-size: 11px; font-variant-numeric: tabular-nums;
  color: var(--jp-ui-font-color2, #555); }
.dw-status { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; min-height: 20px; }
.dw-error { color: #b00020; overflow-wrap: anywhere; }
.dw-faith { margin: 0; flex: 0 1 454px; max-width: 100%; min-width: 0;
  border-top: 1px solid var(--jp-border-color2, #ddd); padding-top: 4px; font-size: 12px; }
.dw-faith[hidden] { display: none; }
.dw-faith-head { display: flex; gap: 8px; align-items: center; }
.dw-faith-title { font-weight: 600; }
.dw-faith-plot { width: 100%; max-width: 360px; height: auto; background: var(--jp-layout-color2, #f4f4f4); }
.dw-faith-line { fill: none; stroke-width: 1.6; vector-effect: non-scaling-stroke; }
.dw-faith-deletion { stroke: #d4480f; fill: #d4480f; }
.dw-faith-insertion { stroke: #1f77b4; fill: #1f77b4; }
.dw-faith-line.dw-faith-deletion, .dw-faith-line.dw-faith-insertion { fill: none; }
.dw-faith-random { stroke-dasharray: 4 3; opacity: 0.7; }
.dw-faith-label { font-size: 8px; text-anchor: end; stroke: none; }
.dw-faith-auc, .dw-faith-operator { margin: 2px 0; color: var(--jp-ui-font-color2, #555); }
.dw-grid { margin: 4px 0 0; }
.dw-grid[hidden] { display: none; }
.dw-grid-caption { font-size: 12px; color: var(--jp-ui-font-color2, #555); margin-bottom: 4px; }
/* Size containment: the grid scrolls inside the explorer's width instead of widening it.
   The canvas covers the scroll box's visible area and draws only what is in view. */
.dw-grid-viewport { position: relative; contain: inline-size; overflow: hidden; }
.dw-grid-scroll { overflow: auto; cursor: pointer; }
.dw-grid-sizer { pointer-events: none; }
.dw-grid-canvas { position: absolute; top: 0; left: 0; display: block; pointer-events: none; }
.dw-grid-sources { display: flex; flex-wrap: wrap; gap: 6px; align-items: center; font-size: 12px; margin-top: 4px; }
.dw-grid-sources[hidden], .dw-patch[hidden], .dw-grid-concept-note[hidden] { display: none; }
.dw-patch input { width: 8em; }
.dw-grid-column, .dw-grid-row { position: absolute; pointer-events: none;
  border: 2px solid #1976d2; border-radius: 2px; box-sizing: border-box; }
.dw-grid-column { width: 30px; }
.dw-grid-row { height: 30px; border-color: #f57d15; }
.dw-grid-hover { margin: 2px 0 0; min-height: 1.2em; font-size: 11px;
  color: var(--jp-ui-font-color2, #555); }
`;
