"""The one way text from data becomes markup: every value escaped, templates literal.

Prompts, item ids, token strings, stored error messages and folder names come from files
other people pass around (a JSONL of captions, a run folder, a trace attached to a bug
report). Where a view needs markup at all (an ``ipywidgets.HTML`` line with a bold key, the
standalone export's ``<title>``, a run's ``summary.md``), the markup is a template written in
the code and every value is escaped here; nothing from data is ever parsed as markup.
``ipywidgets.Label`` is no safe alternative: it typesets ``$…$`` with MathJax, which reads
``\\href`` links. Outside any layer (like ``_threads``), so that runs and widget share it;
``tests/test_markup_safety.py`` fails on markup built any other way.
"""

from __future__ import annotations

import base64
import html
import re
import string
from collections.abc import Iterable

_FIELDS = string.Formatter()
#: Characters that start emphasis, code, links, strike-through or table cells in Markdown.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


class Markup(str):
    """Markup this module made (every value escaped) or a literal the code wrote: never data."""


def markup_join(parts: Iterable[Markup]) -> Markup:
    """Join pieces of markup; each must be a :class:`Markup` (a plain ``str`` is refused).

    Examples
    --------
    >>> markup_join([safe_html("<b>{k}</b>", k="<i>"), Markup("<br>")])
    '<b>&lt;i&gt;</b><br>'
    """
    pieces = list(parts)
    plain = [type(piece).__name__ for piece in pieces if not isinstance(piece, Markup)]
    if plain:
        raise TypeError(f"markup_join takes Markup pieces only, got {plain[0]}: escape it first")
    return Markup("".join(pieces))


def base64_text(data: bytes) -> Markup:
    """``data`` as base64 text: only ``A–Z a–z 0–9 + / =``, inert anywhere in markup.

    Examples
    --------
    >>> base64_text(b"<script>")
    'PHNjcmlwdD4='
    """
    return Markup(base64.b64encode(data).decode("ascii"))


def escape(value: object) -> str:
    """``str(value)`` with ``& < > " '`` as character references: text, never markup.

    Safe as element content and inside a quoted attribute value.

    Examples
    --------
    >>> escape('a red circle <img src=x onerror="alert(1)">')
    'a red circle &lt;img src=x onerror=&quot;alert(1)&quot;&gt;'
    """
    return html.escape(str(value), quote=True)


def safe_html(template: str, /, **values: object) -> Markup:
    """Fill a markup ``template`` written in the code with escaped ``values``.

    Parameters
    ----------
    template : str
        Markup with ``{name}`` fields (``str.format`` syntax without format specs or
        attribute access: the values are text, already formatted).
    **values
        Text for each field; each is converted with ``str`` and escaped.

    Raises
    ------
    ValueError
        When a field has no value, a value has no field, or a field uses a format spec,
        a conversion or indexing (format values before passing them).

    Examples
    --------
    >>> safe_html("<b>{key}</b>: {prompt}", key="dog-1", prompt="<script>alert(1)</script>")
    '<b>dog-1</b>: &lt;script&gt;alert(1)&lt;/script&gt;'
    """
    fields = set()
    for _literal, name, spec, conversion in _FIELDS.parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(
                f"safe_html field {{{name}}} must be a plain name; format the value before "
                "passing it"
            )
        fields.add(name)
    if fields != set(values):
        raise ValueError(
            f"safe_html template fields {sorted(fields)} do not match the values given "
            f"{sorted(values)}"
        )
    return Markup(template.format(**{name: escape(value) for name, value in values.items()}))


def markdown_text(value: object) -> str:
    """``str(value)`` as literal text inside one Markdown line (a table cell, a list item).

    Raw HTML is escaped (Markdown passes it through), Markdown's inline syntax is
    backslash-escaped, and line breaks become spaces (they would end the row or the item).

    Examples
    --------
    >>> markdown_text("a *red* circle | <img src=x onerror=alert(1)>")
    'a \\\\*red\\\\* circle \\\\| &lt;img src=x onerror=alert(1)&gt;'
    """
    text = html.escape(" ".join(str(value).split()), quote=False)
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)
