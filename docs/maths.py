"""MkDocs hook: the documentation's maths rendered to MathML when the site is built.

``pymdownx.arithmatex`` (generic mode) wraps every formula of a page in
``<span class="arithmatex">\\(...\\)</span>`` (inline) or
``<div class="arithmatex">\\[...\\]</div>`` (display); this hook replaces each with the
MathML that ``latex2mathml`` makes of it. Browsers draw MathML themselves, so the site needs no
script, font or network to show its equations.
A formula ``latex2mathml`` cannot convert fails the build with the page and the formula.
"""

from __future__ import annotations

import html
import re
from typing import Any

from latex2mathml.converter import convert

__all__ = ["render", "render_maths"]

MATH = re.compile(r'<(span|div) class="arithmatex">(.*?)</\1>', re.DOTALL)
DELIMITERS = {"span": ("\\(", "\\)"), "div": ("\\[", "\\]")}


def render(latex: str, display: bool) -> str:
    """The MathML ``<math>`` element of one LaTeX formula (without its delimiters)."""
    return convert(latex.strip(), display="block" if display else "inline")


def render_maths(page_html: str, where: str = "the page") -> str:
    """``page_html`` with every arithmatex formula replaced by MathML.

    Raises:
        ValueError: a formula is not wrapped in its delimiters or cannot be converted.
    """

    def one(match: re.Match[str]) -> str:
        tag, body = match.group(1), html.unescape(match.group(2)).strip()
        start, end = DELIMITERS[tag]
        if not (body.startswith(start) and body.endswith(end)):
            raise ValueError(f"{where}: maths {body!r} is not wrapped in {start} ... {end}.")
        latex = body[len(start) : -len(end)]
        try:
            return f'<{tag} class="arithmatex">{render(latex, tag == "div")}</{tag}>'
        except Exception as exc:
            raise ValueError(f"{where}: cannot render the formula {latex!r}: {exc}") from exc

    return MATH.sub(one, page_html)


def on_page_content(html_text: str, page: Any, **kwargs: Any) -> str:
    """The MkDocs event: render the maths of each page's HTML."""
    return render_maths(html_text, where=str(page.file.src_uri))
