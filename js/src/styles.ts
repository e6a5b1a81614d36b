/** Styles scoped under .dw-root; uses JupyterLab theme variables with fallbacks. */
export const STYLES = `
.dw-root { font: 13px/1.4 var(--jp-ui-font-family, system-ui, sans-serif);
  color: var(--jp-ui-font-color1, #222); display: grid; gap: 8px;
  grid-template-columns: auto minmax(260px, 1fr); align-items: start; outline: none; max-width: 900px; }
.dw-root:focus-visible { box-shadow: 0 0 0 2px var(--jp-brand-color1, #1976d2); }
.dw-left, .dw-right { display: flex; flex-direction: column; gap: 6px; min-width: 0; }
.dw-prompt { font-weight: 600; }
.dw-canvas { width: 384px; height: 384px; border-radius: 4px; background: #111; image-rendering: auto; }
.dw-caption { margin: 0; max-width: 384px; font-size: 12px; color: var(--jp-ui-font-color2, #555); }
.dw-slider { grid-column: 1 / -1; display: flex; gap: 8px; align-items: center; }
.dw-track { flex: 1; position: relative; }
.dw-range { width: 100%; margin: 0; }
.dw-marks { position: relative; height: 4px; }
.dw-mark { position: absolute; top: 0; width: 4px; height: 4px; margin-left: -2px;
  border-radius: 2px; background: #d4480f; }
.dw-step-label { font-variant-numeric: tabular-nums; min-width: 150px; }
.dw-controls, .dw-tokens { display: flex; flex-wrap: wrap; gap: 4px; align-items: center; }
.dw-chip { border: 1px solid #bbb; border-radius: 12px; padding: 1px 8px; background: transparent;
  color: inherit; cursor: pointer; }
.dw-chip.dw-active { background: #f57d15; border-color: #f57d15; color: #fff; }
.dw-chip-start, .dw-chip-end, .dw-chip-pad { font-style: italic; opacity: 0.7; }
.dw-special { border: none; background: none; color: var(--jp-brand-color1, #1976d2); cursor: pointer; }
.dw-curves { display: flex; flex-direction: column; gap: 4px; }
.dw-panel-title { font-size: 11px; color: var(--jp-ui-font-color2, #555); }
.dw-plot { width: 100%; height: 80px; cursor: crosshair; background: var(--jp-layout-color2, #f4f4f4); }
.dw-line { fill: none; stroke: #999; stroke-width: 1; vector-effect: non-scaling-stroke; }
.dw-line-selected { stroke: #d4480f; stroke-width: 2.5; }
.dw-cursor { stroke: #1976d2; stroke-width: 1.5; vector-effect: non-scaling-stroke; }
.dw-status { grid-column: 1 / -1; display: flex; gap: 8px; align-items: center; min-height: 20px; }
.dw-error { grid-column: 1 / -1; color: #b00020; }
`;
