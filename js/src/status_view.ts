import { requestCancel } from "./actions";
import { type Cleanup, h, type Model, onChanges } from "./model";

/** Status of heavy work (with progress and cancel) and the last error. */
export function statusView(model: Model, el: HTMLElement): Cleanup {
  const row = h("div", "dw-status");
  row.setAttribute("role", "status");
  row.setAttribute("aria-label", "status");
  const text = h("span", "dw-status-text");
  const bar = h("progress", "dw-progress");
  bar.setAttribute("aria-label", "progress");
  bar.max = 1;
  const cancel = h("button", "dw-cancel", "cancel");
  cancel.type = "button";
  cancel.setAttribute("aria-label", "cancel the running computation");
  const error = h("div", "dw-error");
  error.setAttribute("role", "alert");
  row.append(text, bar, cancel);
  el.append(row, error);

  const update = (): void => {
    const status = model.get("status");
    const progress = model.get("progress");
    const running = status === "running";
    row.dataset.status = status;
    text.textContent = running
      ? `computing… ${Math.round(progress * 100)} %`
      : status === "idle"
        ? ""
        : status;
    bar.value = progress;
    bar.hidden = !running;
    cancel.hidden = !running;
    error.textContent = model.get("error");
    error.hidden = model.get("error") === "";
  };
  const onCancel = (): void => requestCancel(model);
  cancel.addEventListener("click", onCancel);
  const off = onChanges(model, ["status", "progress", "error"], update);
  update();
  return () => {
    off();
    cancel.removeEventListener("click", onCancel);
    row.remove();
    error.remove();
  };
}
