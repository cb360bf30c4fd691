"""Griffe extension for the API reference: render reST markup found in camkit's docstrings.

The docstrings are Google style, but some use Sphinx roles (``:class:`~camkit.result.CamResult```)
and ``.. math::`` directives, which Markdown shows verbatim. Before the docstrings are parsed,
this extension rewrites

* a role into a cross-reference to the object when the API reference renders it, and into
  inline code otherwise (an ``optional`` autoref: no warning when the target is absent);
* a ``.. math::`` directive into an arithmatex ``$$ ... $$`` block;
* an ``Example:`` section made of ``>>>`` lines into ``Examples:``, the Google section that
  renders them as a Python console session (``Example:`` renders as an admonition, where
  ``>>>`` becomes nested quotes).

Docstrings without such markup pass through unchanged. Loaded from ``mkdocs.yml``
(``plugins.mkdocstrings.handlers.python.options.extensions``); not part of the site.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|attr|data|mod|obj|exc|const):`(?P<tilde>~?)(?P<target>[\w.]+)`"
)
_MATH = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<expr>.*)$")
_EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*\n(?=(?:[ \t]*\n)*[ \t]+>>>)", re.M)


def _lookup(pkg: griffe.Object, path: str) -> str:
    """The canonical path of ``path`` (a dotted path inside ``pkg``), following re-exports."""
    obj: Any = pkg
    for part in path.split(".")[1:]:
        obj = obj.members[part]
        if obj.is_alias:
            obj = obj.final_target
    return str(obj.path)


def _resolve(scope: griffe.Object, pkg: griffe.Object, target: str) -> str:
    head, _, rest = target.partition(".")
    try:
        if head == pkg.name:
            return _lookup(pkg, target)
        base = _lookup(pkg, scope.resolve(head))
        return _lookup(pkg, f"{base}.{rest}") if rest else base
    except Exception:
        return target


def _roles(text: str, scope: griffe.Object, pkg: griffe.Object) -> str:
    def repl(match: re.Match[str]) -> str:
        target = match["target"]
        title = target.rsplit(".", 1)[-1] if match["tilde"] else target
        identifier = _resolve(scope, pkg, target)
        return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'

    return _ROLE.sub(repl, text)


def _math(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _MATH.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent, body = match["indent"], [match["expr"].strip()] if match["expr"].strip() else []
        i += 1
        if not body:  # the directive's content is the indented block that follows
            while i < len(lines) and not lines[i].strip():
                i += 1
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
            ):
                body.append(lines[i].strip())
                i += 1
            while body and not body[-1]:
                body.pop()
        out.extend(["", f"{indent}$$", *(f"{indent}{b}" for b in body), f"{indent}$$", ""])
    return "\n".join(out)


class RestMarkup(griffe.Extension):
    """Rewrite reST roles and math directives in every docstring of the loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._visit(pkg, pkg)

    def _visit(self, obj: griffe.Object, pkg: griffe.Module) -> None:
        if obj.docstring is not None:
            value = obj.docstring.value
            if ":`" in value or ".. math::" in value or "Example:" in value:
                value = _EXAMPLE.sub(r"\g<indent>Examples:\n", value)
                obj.docstring.value = _math(_roles(value, obj, pkg))
        for member in obj.members.values():
            if isinstance(member, griffe.Object):  # skip re-exports (aliases)
                self._visit(member, pkg)
