import { selectToken, setValue, tokenVisible } from "./actions";
import { type Cleanup, h, type Model, onChanges } from "./model";

/** One chip per token; start/end/pad appear when "special tokens" is on. */
export function tokensView(model: Model, el: HTMLElement): Cleanup {
  const row = h("div", "dw-tokens");
  el.appendChild(row);

  const build = (): void => {
    row.replaceChildren();
    const kinds = model.get("token_kinds");
    const show = model.get("show_special");
    model.get("tokens").forEach((text, index) => {
      const kind = kinds[index] ?? "word";
      if (!tokenVisible(kind, show)) return;
      const chip = h("button", `dw-chip dw-chip-${kind}`, text);
      chip.type = "button";
      chip.dataset.token = String(index);
      if (index === model.get("token")) chip.classList.add("dw-active");
      chip.addEventListener("click", () => selectToken(model, index));
      row.appendChild(chip);
    });
    const toggle = h("button", "dw-special", show ? "hide special" : "show special");
    toggle.type = "button";
    toggle.title = "Show the start, end and padding tokens";
    toggle.addEventListener("click", () => setValue(model, "show_special", !show));
    row.appendChild(toggle);
  };
  const off = onChanges(model, ["tokens", "token_kinds", "token", "show_special"], build);
  build();
  return () => {
    off();
    row.remove();
  };
}
