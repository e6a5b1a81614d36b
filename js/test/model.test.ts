import { describe, expect, it } from "vitest";
import { setSafeAttribute } from "../src/model";

/** Records attributes like an element would (vitest runs without a DOM). */
function fakeElement(): { node: Element; attributes: Map<string, string> } {
  const attributes = new Map<string, string>();
  const node = {
    setAttribute: (name: string, value: string) => attributes.set(name, value),
  } as unknown as Element;
  return { node, attributes };
}

describe("setSafeAttribute", () => {
  it("sets ordinary attributes, values kept as text", () => {
    const { node, attributes } = fakeElement();
    setSafeAttribute(node, "data-name", '"><img src=x onerror=alert(1)>');
    setSafeAttribute(node, "class", "dw-line");
    expect(attributes.get("data-name")).toBe('"><img src=x onerror=alert(1)>');
    expect(attributes.get("class")).toBe("dw-line");
  });

  it.each(["onclick", "ONLOAD", "onerror", "href", "xlink:href", "src", "srcdoc", "formaction"])(
    "refuses %s",
    (name) => {
      const { node, attributes } = fakeElement();
      expect(() => setSafeAttribute(node, name, "alert(1)")).toThrow(/refusing/);
      expect(attributes.size).toBe(0);
    },
  );
});
