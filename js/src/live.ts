/**
 * Entry of the lazily loaded live bundle (static/live.js): the embedded model generating in
 * the page. The main widget bundle (static/widget.js) does not include any of it.
 */
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
