"""No markup is ever built from data: a lint of the package's Python and the front-end's TypeScript.

Prompts, ids, tokens, errors and folder names come from files other people pass around; a
prompt ``<img src=x onerror=…>`` placed into markup runs script in the viewer's page. The
Python side is checked on its syntax tree:

* every ``HTML(…)`` / ``HTMLMath(…)`` / ``Markdown(…)`` gets a literal, or
  ``safe_html("<literal template>", name=value, …)`` (``diffwidget._markup``), which escapes
  every value; the same for ``X.value = …`` where ``X`` holds such a widget;
* no f-string, ``%``, ``+`` or ``.format`` puts a non-literal value next to an HTML tag,
  unless that value is made safe by a named function (``escape``, ``safe_html``,
  ``script_safe_json``, ``module_base64``);
* ``description_allow_html`` (ipywidgets' switch to parse descriptions as HTML) is never used.

The TypeScript side is a source scan: no ``innerHTML``-like sink, no event-handler or URL
attribute, no attribute whose name is not a literal outside the one guarded helper, and no
``href``/``src`` set from anything but a canvas' own data URL.

Each rule is shown to fire on a small bad example, so the lint cannot pass by finding nothing.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "diffwidget"
JS_SRC = ROOT / "js" / "src"

#: Calls whose argument is rendered as markup by a notebook front-end.
MARKUP_WIDGETS = frozenset({"HTML", "HTMLMath", "Markdown"})
#: Functions whose result is safe to place in markup (they escape, or yield an inert alphabet).
SAFE_FUNCTIONS = frozenset(
    {"escape", "safe_html", "script_safe_json", "module_base64", "base64_text", "markup_join"}
)
#: HTML and SVG element names (``<s>`` is left out: tokenizers use it as a token string).
_TAG_NAMES = (
    "a|abbr|audio|b|base|body|br|button|canvas|circle|code|dd|details|div|dl|dt|em|embed|"
    "figcaption|figure|font|footer|foreignobject|form|g|h[1-6]|head|header|hr|html|i|iframe|"
    "image|img|input|kbd|label|li|line|link|main|mark|marquee|math|meta|nav|object|ol|option|p|"
    "path|polyline|pre|q|rect|script|section|select|small|source|span|strong|style|sub|summary|"
    "sup|svg|table|tbody|td|template|text|textarea|th|thead|title|tr|tspan|u|ul|video"
)
_TAG = re.compile(rf"<\s*/?\s*(?:{_TAG_NAMES})\b|<!", re.IGNORECASE)


# ------------------------------------------------------------------------------- Python
def _name(node: ast.AST) -> str | None:
    """The called name: ``f`` for ``f(...)``, ``g`` for ``a.b.g(...)``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _is_safe(node: ast.AST) -> bool:
    """A value that may stand in markup: a literal, or the result of a safe function."""
    if isinstance(node, ast.Constant):
        return True
    return isinstance(node, ast.Call) and _name(node.func) in SAFE_FUNCTIONS


def _is_markup_value(node: ast.AST) -> bool:
    """What a markup widget may receive: a literal string or a ``safe_html`` call."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return True
    return isinstance(node, ast.Call) and _name(node.func) == "safe_html"


def _has_tag(text: object) -> bool:
    return isinstance(text, str) and bool(_TAG.search(text))


def _concat_parts(node: ast.AST) -> Iterator[ast.AST]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        yield from _concat_parts(node.left)
        yield from _concat_parts(node.right)
    else:
        yield node


class MarkupLint(ast.NodeVisitor):
    """Collects ``line: problem`` for one module (see the module docstring for the rules)."""

    def __init__(self, tree: ast.Module) -> None:
        self.problems: list[str] = []
        # Module-level names bound to a literal holding markup (templates such as _TEMPLATE).
        self.templates = {
            target.id
            for node in tree.body
            if isinstance(node, ast.Assign) and _has_tag(getattr(node.value, "value", None))
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        # Targets that hold a markup widget (``self._header = w.HTML(...)``).
        self.widgets = {
            ast.unparse(target)
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and _name(node.value.func) in MARKUP_WIDGETS
            for target in node.targets
        }
        self._reported: set[int] = set()

    def _report(self, node: ast.AST, problem: str) -> None:
        if id(node) not in self._reported:
            self._reported.add(id(node))
            self.problems.append(f"{getattr(node, 'lineno', '?')}: {problem}")

    def visit_Call(self, node: ast.Call) -> None:
        name = _name(node.func)
        if name in MARKUP_WIDGETS:
            values = node.args[:1] + [k.value for k in node.keywords if k.arg == "value"]
            for value in values:
                if not _is_markup_value(value):
                    self._report(
                        node,
                        f"{name}() gets {ast.unparse(value)[:60]}: pass a literal or "
                        'safe_html("<template>", name=value)',
                    )
        if name == "safe_html" and not (
            node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            self._report(node, "safe_html's template must be a literal string")
        if name == "format" and isinstance(node.func, ast.Attribute):
            receiver = node.func.value
            markup = _has_tag(getattr(receiver, "value", None)) or (
                isinstance(receiver, ast.Name) and receiver.id in self.templates
            )
            values = [*node.args, *(k.value for k in node.keywords)]
            if markup and not all(_is_safe(v) for v in values):
                self._report(node, "markup template filled by .format with unescaped values")
        for keyword in node.keywords:
            if keyword.arg == "description_allow_html":
                self._report(node, "description_allow_html parses descriptions as HTML")
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            if (
                isinstance(target, ast.Attribute)
                and target.attr == "value"
                and ast.unparse(target.value) in self.widgets
                and not _is_markup_value(node.value)
            ):
                self._report(node, f"{ast.unparse(target)} set to markup from data")
        self.generic_visit(node)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        literal = "".join(str(v.value) for v in node.values if isinstance(v, ast.Constant))
        fields = [v.value for v in node.values if isinstance(v, ast.FormattedValue)]
        if _has_tag(literal) and not all(_is_safe(f) for f in fields):
            self._report(node, "f-string puts an unescaped value next to markup")
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        if isinstance(node.op, ast.Mod) and _has_tag(getattr(node.left, "value", None)):
            self._report(node, "markup template filled by % with data")
        if isinstance(node.op, ast.Add):
            parts = list(_concat_parts(node))
            if any(_has_tag(getattr(p, "value", None)) for p in parts) and not all(
                _is_safe(p) for p in parts
            ):
                self._report(node, "markup concatenated with an unescaped value")
        self.generic_visit(node)


def python_problems(source: str) -> list[str]:
    """``line: problem`` for every place ``source`` builds markup from data."""
    tree = ast.parse(source)
    lint = MarkupLint(tree)
    lint.visit(tree)
    return lint.problems


BAD_PYTHON = {
    "HTML f-string": 'import ipywidgets as w\nw.HTML(f"<b>{key}</b>: {prompt}")\n',
    "HTML value keyword": "from ipywidgets import HTML\nHTML(value=prompt)\n",
    "HTMLMath": "import ipywidgets as w\nw.HTMLMath(text)\n",
    "IPython HTML": "from IPython.display import HTML\nHTML('<p>' + prompt + '</p>')\n",
    "value set later": (
        'import ipywidgets as w\nself.caption = w.HTML("")\nself.caption.value = prompt\n'
    ),
    "value f-string": 'self.status.value = f"<i>{error}</i>"\n',
    "format": 'page = "<title>{t}</title>".format(t=prompt)\n',
    "module template": '_PAGE = "<title>{t}</title>"\npage = _PAGE.format(t=title)\n',
    "percent": 'text = "<td>%s</td>" % prompt\n',
    "concatenation": 'row = "<td>" + prompt + "</td>"\n',
    "safe_html with f-string": 'safe_html(f"<b>{key}</b>")\n',
    "allow html": "w.Button(description=name, description_allow_html=True)\n",
    "svg text": 'label = f"<text x=1>{token}</text>"\n',
}
GOOD_PYTHON = {
    "literal": 'import ipywidgets as w\nw.HTML("<style>.x{color:red}</style>")\n',
    "safe_html": 'w.HTML(safe_html("<b>{key}</b>: {prompt}", key=key, prompt=prompt))\n',
    "escaped field": 'text = f"<b>{escape(key)}</b>"\n',
    "format with safe values": '_PAGE = "<title>{t}</title>"\n_PAGE.format(t=escape(title))\n',
    "no markup": 'text = f"{key}: {prompt}"\nlabel = f"<bytes {n}>"\n',
}


@pytest.mark.parametrize("case", sorted(BAD_PYTHON))
def test_python_lint_catches(case: str) -> None:
    assert python_problems(BAD_PYTHON[case]), case


@pytest.mark.parametrize("case", sorted(GOOD_PYTHON))
def test_python_lint_accepts(case: str) -> None:
    assert python_problems(GOOD_PYTHON[case]) == [], case


def test_the_package_builds_no_markup_from_data() -> None:
    problems = [
        f"{path.relative_to(ROOT)}:{problem}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for problem in python_problems(path.read_text(encoding="utf-8"))
    ]
    assert not problems, "markup built from data (use diffwidget._markup):\n" + "\n".join(problems)


# ---------------------------------------------------------------------------- TypeScript
#: Sinks that parse a string as HTML or code.
TS_SINKS = re.compile(
    r"\.(?:innerHTML|outerHTML)\b|insertAdjacentHTML|document\.write|createContextualFragment"
    r"|DOMParser|\.srcdoc\b|setHTMLUnsafe|parseHTMLUnsafe|\beval\s*\(|new\s+Function\s*\("
    r"|\.html\s*\("
)
#: Attributes that run code or load a URL.
_DANGEROUS_ATTRIBUTE = r"(?:on\w+|href|xlink:href|src|action|formaction|srcdoc)"
TS_DANGEROUS_LITERAL = re.compile(
    r"setAttribute(?:NS)?\s*\(\s*(?:[^,()]+,\s*)?[\"'`]" + _DANGEROUS_ATTRIBUTE + r"[\"'`]",
    re.IGNORECASE,
)
TS_DYNAMIC_NAME = re.compile(r"setAttribute(?:NS)?\s*\(\s*(?![\"'`\s])")
TS_URL_PROPERTY = re.compile(r"\.(?:href|src|action|formAction)\s*=(?!=)\s*(?P<value>[^;]+)")
TS_ON_PROPERTY = re.compile(r"\.on[a-z]+\s*=(?!=)")
#: Where a data URL made by the page itself may be assigned (the PNG download link).
TS_SAFE_URL = re.compile(r"^\w+\.toDataURL\(")
#: The one helper allowed to set attributes by variable name: it refuses dangerous names.
TS_GUARDED_SETTER = "setSafeAttribute"


def _strip_ts_comments(source: str) -> str:
    source = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), source, flags=re.S)
    return re.sub(r"(?m)(^|[^:\\])//.*$", r"\1", source)


def ts_problems(source: str) -> list[str]:
    """``line: problem`` for every HTML sink or data-driven URL/handler attribute."""
    code = _strip_ts_comments(source)
    lines = code.splitlines()
    guarded = _guarded_setter_lines(lines)
    checks = [
        (TS_SINKS, "parses a string as HTML or code"),
        (TS_DANGEROUS_LITERAL, "sets an event-handler or URL attribute"),
        (TS_DYNAMIC_NAME, f"attribute name from a variable; use {TS_GUARDED_SETTER}"),
        (TS_URL_PROPERTY, "URL property set from a value"),
        (TS_ON_PROPERTY, "event handler property assigned"),
    ]
    problems = []
    for pattern, problem in checks:
        for match in pattern.finditer(code):
            number = code.count("\n", 0, match.start()) + 1
            if pattern is TS_DYNAMIC_NAME and number in guarded:
                continue
            if pattern is TS_URL_PROPERTY and TS_SAFE_URL.match(match.group("value").strip()):
                continue
            problems.append(f"{number}: {problem}: {lines[number - 1].strip()}")
    return problems


def _guarded_setter_lines(lines: list[str]) -> set[int]:
    """Lines of the body of ``function setSafeAttribute`` (which checks the name first)."""
    inside, depth, found = False, 0, set()
    for number, line in enumerate(lines, 1):
        if re.search(rf"function\s+{TS_GUARDED_SETTER}\b", line):
            inside, depth = True, 0
        if inside:
            found.add(number)
            depth += line.count("{") - line.count("}")
            if depth <= 0 and "}" in line:
                inside = False
    return found


BAD_TS = {
    "innerHTML": "node.innerHTML = `<b>${model.get('prompt')}</b>`;",
    "outerHTML": "el.outerHTML = text;",
    "insertAdjacentHTML": "row.insertAdjacentHTML('beforeend', chip);",
    "handler attribute": 'node.setAttribute("onclick", code);',
    "href attribute": "link.setAttribute('href', url);",
    "svg href": 'use.setAttributeNS(XLINK, "xlink:href", url);',
    "dynamic name": "for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);",
    "href property": "link.href = model.get('prompt');",
    "src property": "img.src = `data:${kind}`;",
    "handler property": "img.onerror = handler;",
    "eval": "eval(text);",
    "document.write": "document.write(html);",
    "srcdoc": "frame.srcdoc = page;",
}
GOOD_TS = {
    "textContent": "node.textContent = model.get('prompt');",
    "aria label": 'chip.setAttribute("aria-label", `token ${text}`);',
    "data url": 'link.href = canvas.toDataURL("image/png");',
    "comment": "// never use innerHTML here\nnode.textContent = text;",
    "guarded helper": (
        "export function setSafeAttribute(node: Element, name: string, value: string): void {\n"
        "  if (UNSAFE.test(name)) throw new Error(name);\n"
        "  node.setAttribute(name, value);\n"
        "}\n"
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TS))
def test_typescript_scan_catches(case: str) -> None:
    assert ts_problems(BAD_TS[case]), case


@pytest.mark.parametrize("case", sorted(GOOD_TS))
def test_typescript_scan_accepts(case: str) -> None:
    assert ts_problems(GOOD_TS[case]) == [], case


def test_the_front_end_builds_no_markup_from_strings() -> None:
    sources = sorted(JS_SRC.rglob("*.ts"))
    assert sources, f"no TypeScript under {JS_SRC}"
    problems = [
        f"{path.relative_to(ROOT)}:{problem}"
        for path in sources
        for problem in ts_problems(path.read_text(encoding="utf-8"))
    ]
    assert not problems, "use textContent and setSafeAttribute:\n" + "\n".join(problems)
