"""``js/src/schema.ts``, generated from :mod:`diffwidget.widget.schema`.

The trait table, the enumerations and the constants the front end shares with the kernel are
declared once, in Python; :func:`typescript` writes them as TypeScript (with the payload
interfaces of :mod:`diffwidget.widget.payload_types`). ``python -m
diffwidget.widget.schema_ts`` rewrites the file; ``--check`` fails when it has drifted.
"""

from __future__ import annotations

import sys
from pathlib import Path

from diffwidget._generated import write_or_check
from diffwidget.explain.intervention_results import COMMITTED_LEVEL
from diffwidget.widget import schema
from diffwidget.widget.payload_types import TS_PAYLOADS


def _ts_type(spec: schema.TraitSpec) -> str:
    if spec.kind == "enum":
        assert spec.enum is not None
        return spec.enum
    if spec.kind == "json":
        assert spec.ts_type is not None
        return spec.ts_type
    return {
        "int": "number",
        "float": "number",
        "bool": "boolean",
        "str": "string",
        "text": "string",
        "str_list": "string[]",
        "int_list": "number[]",
    }[spec.kind]


def typescript() -> str:
    """Return the TypeScript module ``js/src/schema.ts``, generated from the trait table
    (:data:`~diffwidget.widget.schema.TRAITS`) and the shared constants."""
    lines = [
        "// Generated from diffwidget/widget/schema.py by schema_ts.py; do not edit.",
        "// Regenerate with `python -m diffwidget.widget.schema_ts`.",
        "",
    ]
    for name, values in schema.ENUMS.items():
        union = " | ".join(f'"{v}"' for v in values)
        const = _snake_upper(name)
        lines.append(f"export type {name} = {union};")
        items = ", ".join(f'"{v}"' for v in values)
        lines.append(f"export const {const}: readonly {name}[] = [{items}];")
        lines.append("")
    labels = ", ".join(f'{k}: "{v}"' for k, v in schema.OVERLAY_LABELS.items())
    lines.append("/** Human names of the overlays. */")
    lines.append(
        f"export const OVERLAY_LABELS: Readonly<Record<OverlayKind, string>> = {{ {labels} }};"
    )
    stops = ", ".join(f"[{r}, {g}, {b}]" for r, g, b in schema.COLORMAP_STOPS)
    lines.append(f"/** {schema.COLORMAP_NAME} colour map, evenly spaced stops in [0, 1]. */")
    lines.append(f'export const COLORMAP_NAME = "{schema.COLORMAP_NAME}";')
    lines.append(
        f"export const COLORMAP_STOPS: readonly (readonly [number, number, number])[] = [{stops}];"
    )
    lines.append(f"export const MEAN_OVER_HEADS = {schema.MEAN_OVER_HEADS};")
    lines.append(f"export const CONCEPT_MAX_CHARS = {schema.CONCEPT_MAX_CHARS};")
    lines.append(f"export const COMMITTED_LEVEL = {COMMITTED_LEVEL};")
    lines.append(f"export const SWITCH_MAX_SEEDS = {schema.SWITCH_MAX_SEEDS};")
    palette = ", ".join(f'"{c}"' for c in schema.CURVE_PALETTE)
    lines.append(f"export const CURVE_PALETTE: readonly string[] = [{palette}];")
    for name, table in (
        ("CURVE_GROUP_TITLES", schema.CURVE_GROUP_TITLES),
        ("CURVE_GROUP_UNITS", schema.CURVE_GROUP_UNITS),
    ):
        entries = ", ".join(f'{k}: "{v}"' for k, v in table.items())
        lines.append(
            f"export const {name}: Readonly<Record<CurveGroup, string>> = {{ {entries} }};"
        )
    lines.append("")
    lines.append(TS_PAYLOADS)
    lines.append("/** Every synced trait of the explorer widget. */")
    lines.append("export interface WidgetState {")
    for spec in schema.TRAITS:
        access = "" if spec.writable else "readonly "
        lines.append(f"  /** {spec.doc} */")
        lines.append(f"  {access}{spec.name}: {_ts_type(spec)};")
    lines.append("}")
    lines.append("")
    writable = ", ".join(f'"{name}"' for name in schema.FRONTEND_WRITABLE)
    lines.append(f"export const FRONTEND_WRITABLE = [{writable}] as const;")
    lines.append("export type WritableKey = (typeof FRONTEND_WRITABLE)[number];")
    payloads = ", ".join(f'"{name}"' for name in schema.PAYLOAD_TRAITS)
    lines.append(f"export const PAYLOAD_TRAITS = [{payloads}] as const;")
    lines.append("")
    return "\n".join(lines)


def _snake_upper(camel: str) -> str:
    out = []
    for i, ch in enumerate(camel):
        if ch.isupper() and i:
            out.append("_")
        out.append(ch.upper())
    plural = "ES" if camel.endswith("s") else "S"
    return "".join(out) + plural


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check`` compare) ``js/src/schema.ts``."""
    argv = sys.argv[1:] if argv is None else argv
    target = Path(__file__).resolve().parents[2] / "js" / "src" / "schema.ts"
    return write_or_check(target, typescript(), "python -m diffwidget.widget.schema_ts", argv)


if __name__ == "__main__":
    raise SystemExit(main())
