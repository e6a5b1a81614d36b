import { overlayName, overlayUsesToken, selectToken, setValue, tokenVisible } from "./actions";
import { type Cleanup, h, type Model, onChanges } from "./model";

/** One chip per token; start/end/pad appear when "special tokens" is on. */
export function tokensView(model: Model, el: HTMLElement): Cleanup {
  const row = h("div", "dw-tokens");
  row.setAttribute("role", "group");
  row.setAttribute("aria-label", "prompt tokens");
  el.appendChild(row);

  const build = (): void => {
    row.replaceChildren();
    const kinds = model.get("token_kinds");
    const show = model.get("show_special");
    const overlay = model.get("overlay");
    // Under a map that ignores the token (DF-RISE, DF-CAM), chips are dimmed: selecting
    // one shows its attention only once the overlay is attention.
    const dimmed = overlay !== "none" && !overlayUsesToken(overlay);
    row.classList.toggle("dw-tokens-dimmed", dimmed);
    row.title = dimmed ? `${overlayName(overlay)} does not depend on the token` : "";
    model.get("tokens").forEach((text, index) => {
      const kind = kinds[index] ?? "word";
      if (!tokenVisible(kind, show)) return;
      const chip = h("button", `dw-chip dw-chip-${kind}`, text);
      chip.type = "button";
      chip.dataset.token = String(index);
      const active = index === model.get("token");
      if (active) chip.classList.add("dw-active");
      chip.setAttribute("aria-pressed", String(active));
      chip.setAttribute("aria-label", `token ${text} (position ${index})`);
      chip.addEventListener("click", () => selectToken(model, index));
      row.appendChild(chip);
    });
    const toggle = h("button", "dw-special", show ? "hide special" : "show special");
    toggle.type = "button";
    toggle.title = "Show the start, end and padding tokens";
    toggle.setAttribute("aria-label", show ? "hide special tokens" : "show special tokens");
    toggle.addEventListener("click", () => setValue(model, "show_special", !show));
    row.appendChild(toggle);
  };
  const off = onChanges(
    model,
    ["tokens", "token_kinds", "token", "show_special", "overlay"],
    build,
  );
  build();
  return () => {
    off();
    row.remove();
  };
}
