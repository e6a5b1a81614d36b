import { ensureBinary } from "./data";
import type { Model } from "./model";
import type { WidgetState } from "./schema";

type Handler = (...args: unknown[]) => void;

/** A kernel-less model holding widget state in the page (standalone HTML, unit tests). */
export class LocalModel {
  private state: WidgetState;
  private handlers = new Map<string, Set<Handler>>();
  /** Messages the view sent (a kernel would receive these). */
  readonly sent: unknown[] = [];
  /** How often the view asked to sync its changes. */
  saves = 0;

  constructor(state: WidgetState) {
    this.state = { ...state };
  }

  get<K extends keyof WidgetState>(key: K): WidgetState[K] {
    return this.state[key];
  }

  set<K extends keyof WidgetState>(key: K, value: WidgetState[K]): void {
    const before = this.state[key];
    this.state[key] = value;
    if (before !== value) this.emit(`change:${String(key)}`);
  }

  on(event: string, handler: Handler): void {
    let set = this.handlers.get(event);
    if (!set) {
      set = new Set();
      this.handlers.set(event, set);
    }
    set.add(handler);
  }

  off(event?: string | null, handler?: Handler | null): void {
    if (!event) this.handlers.clear();
    else if (!handler) this.handlers.delete(event);
    else this.handlers.get(event)?.delete(handler);
  }

  save_changes(): void {
    this.saves += 1;
  }

  send(content: unknown): void {
    this.sent.push(content);
  }

  /** Number of handlers still subscribed (tests check views clean up). */
  listenerCount(): number {
    let n = 0;
    for (const set of this.handlers.values()) n += set.size;
    return n;
  }

  private emit(event: string): void {
    for (const handler of this.handlers.get(event) ?? []) handler();
  }

  readonly widget_manager = {
    get_model: () => Promise.reject(new Error("no widget manager without a kernel")),
  };

  /** This object typed as the anywidget model the views expect. */
  asModel(): Model {
    return this as unknown as Model;
  }
}

/**
 * Turn exported JSON state into WidgetState with DataViews: buffers as `{"$buf": [offset,
 * length]}` views into `data` (the file's inflated data block), or `{"$b64": text}`.
 */
export function decodeState(json: unknown, data?: Uint8Array): WidgetState {
  return ensureBinary(structuredClone(json), data) as WidgetState;
}
