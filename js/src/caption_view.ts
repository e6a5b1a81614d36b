import { captionText } from "./actions";
import { shownAttention } from "./data";
import { type Cleanup, h, type Model, onChanges } from "./model";

/** The sentence under the image stating what is drawn and aggregated. */
export function captionView(model: Model, el: HTMLElement): Cleanup {
  const caption = h("p", "dw-caption");
  caption.setAttribute("aria-label", "caption");
  caption.setAttribute("aria-live", "polite");
  el.appendChild(caption);
  const update = (): void => {
    caption.textContent = captionText({
      step: model.get("step"),
      token: model.get("token"),
      overlay: model.get("overlay"),
      image_mode: model.get("image_mode"),
      tokens: model.get("tokens"),
      timesteps: model.get("timesteps"),
      descriptions: model.get("descriptions"),
      overlays: model.get("overlays"),
      attention: shownAttention(model),
      concept: model.get("concept"),
    });
  };
  const off = onChanges(
    model,
    [
      "step",
      "token",
      "overlay",
      "image_mode",
      "tokens",
      "timesteps",
      "descriptions",
      "overlays",
      "attention",
      "attention_filtered",
      "attention_layer",
      "attention_head",
      "concept",
    ],
    update,
  );
  update();
  return () => {
    off();
    caption.remove();
  };
}
