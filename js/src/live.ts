/**
 * Entry of the lazily loaded live bundle (static/live.js): the embedded model generating in
 * the page. The main widget bundle (static/widget.js) does not include any of it.
 */
import type { RenderProps } from "@anywidget/types";
import {
  type AssetSource,
  embeddedSource,
  folderSource,
  type PageConfig,
  wasmProblem,
} from "./live/assets";
import { type LiveHandle, startPage } from "./live/page";

export { decodeBase64, loadAssets } from "./live/assets";
export { stateFromRun } from "./live/payloads";
export { LiveModel } from "./live/runtime";
export type { AssetSource, LiveHandle, PageConfig };
export { embeddedSource, folderSource, startPage, wasmProblem };

declare global {
  interface Window {
    diffwidgetLive?: LiveHandle;
  }
}

/** Start the page from its embedded config; assets embedded, or in the page's folder. */
export function start(root: HTMLElement, config: PageConfig, base?: string): LiveHandle {
  const source = base === undefined ? embeddedSource() : folderSource(base);
  const handle = startPage(root, source, config);
  window.diffwidgetLive = handle;
  return handle;
}

/** State of the notebook widget (diffwidget/widget/live_widget.py's LiveWidget). */
export interface LiveWidgetState {
  config: PageConfig;
  /** Asset file name -> its bytes (binary buffers). */
  assets: Record<string, DataView>;
}

/** Assets that arrived as the widget's binary buffers. */
export function widgetSource(assets: Record<string, DataView>): AssetSource {
  return {
    async bytes(file: string): Promise<Uint8Array> {
      const view = assets[file];
      if (!(view instanceof DataView)) throw new Error(`the widget holds no ${file}`);
      return new Uint8Array(view.buffer, view.byteOffset, view.byteLength);
    },
  };
}

/**
 * anywidget entry: the live page inside a notebook. Once its assets arrived it needs the
 * kernel no more (a dead kernel or a Voila page still generates); when the page forbids
 * WebAssembly it says so and asks the kernel to run the caption instead.
 */
function render({ model, el }: RenderProps<LiveWidgetState>): () => void {
  const problem = wasmProblem();
  if (problem) model.send({ kind: "no_wasm", reason: problem });
  const handle = startPage(el, widgetSource(model.get("assets")), model.get("config"));
  window.diffwidgetLive = handle;
  return () => {
    el.replaceChildren();
  };
}

export default { render };
