import type { AnyModel } from "@anywidget/types";
import type { WidgetState } from "./schema";

/** The widget model as the views see it: typed by the generated schema. */
export type Model = AnyModel<WidgetState>;

/** Every view returns one of these; the entry point calls them all on teardown. */
export type Cleanup = () => void;

/** Subscribe `handler` to `change:<key>` for each key; returns the matching unsubscribe. */
export function onChanges(model: Model, keys: (keyof WidgetState)[], handler: () => void): Cleanup {
  for (const key of keys) model.on(`change:${key}`, handler);
  return () => {
    for (const key of keys) model.off(`change:${key}`, handler);
  };
}

/** Create an element with a class name (and optional text). */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className: string,
  text?: string,
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Attribute names that run code (`on…`) or load a URL: never set from a name held in data. */
const UNSAFE_ATTRIBUTE = /^(on|(xlink:)?href$|src$|srcdoc$|action$|formaction$)/i;

/**
 * Set an attribute whose *name* is held in a variable (an SVG helper's attribute map).
 * Values set with `setAttribute` are text, never parsed; names that run code or load a URL
 * are refused, so no map can ever add an event handler or a link.
 */
export function setSafeAttribute(node: Element, name: string, value: string): void {
  if (UNSAFE_ATTRIBUTE.test(name)) throw new Error(`refusing to set attribute ${name}`);
  node.setAttribute(name, value);
}
