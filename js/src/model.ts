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
