"""The documentation site works offline: its maths is MathML made at build time, and it loads no
script or stylesheet from another site."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
MATHML = 'xmlns="http://www.w3.org/1998/Math/MathML"'
# what a browser would fetch: script and stylesheet addresses, CSS url(...) and @import
FETCHED = re.compile(
    r"""<script[^>]*\ssrc=["']([^"']+)["']|<link[^>]*\shref=["']([^"']+)["']"""
    r"""|url\(\s*["']?([^"')\s]+)|@import\s+["']([^"']+)["']"""
)


def _hook() -> ModuleType:
    pytest.importorskip("latex2mathml")
    spec = importlib.util.spec_from_file_location("camkit_docs_maths", ROOT / "docs" / "maths.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_formulas_become_mathml() -> None:
    maths = _hook()
    inline = '<p>so <span class="arithmatex">\\(a &lt; x^2\\)</span>.</p>'
    assert maths.render_maths(inline) == (
        f'<p>so <span class="arithmatex"><math {MATHML} display="inline"><mrow><mi>a</mi>'
        "<mo>&#x0003C;</mo><msup><mi>x</mi><mn>2</mn></msup></mrow></math></span>.</p>"
    )
    block = '<div class="arithmatex">\\[\n\\frac{1}{Z}\n\\]</div>'
    assert maths.render_maths(block) == (
        f'<div class="arithmatex"><math {MATHML} display="block"><mrow><mfrac><mrow><mn>1</mn>'
        "</mrow><mrow><mi>Z</mi></mrow></mfrac></mrow></math></div>"
    )
    with pytest.raises(ValueError, match="not wrapped"):
        maths.render_maths('<span class="arithmatex">$x$</span>')


def test_every_formula_of_the_docs_renders_and_no_script_is_remote() -> None:
    maths = _hook()
    markdown = pytest.importorskip("markdown")
    yaml = pytest.importorskip("yaml")
    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_multi_constructor("!", lambda *_: None)  # mkdocs' own tags (!relative)
    config = yaml.load((ROOT / "mkdocs.yml").read_text("utf-8"), Loader=loader)
    assert "docs/maths.py" in config["hooks"]
    for key in ("extra_javascript", "extra_css"):
        for entry in config.get(key, []):
            path = entry if isinstance(entry, str) else entry["path"]
            assert "//" not in path and (ROOT / "docs" / path).is_file(), (key, path)
    formulas = 0
    for page in sorted((ROOT / "docs").rglob("*.md")):
        html = markdown.markdown(
            page.read_text("utf-8"),
            extensions=["pymdownx.superfences", "pymdownx.arithmatex"],
            extension_configs={"pymdownx.arithmatex": {"generic": True}},
        )
        wrapped = len(maths.MATH.findall(html))
        rendered = maths.render_maths(html, where=page.name)
        assert rendered.count(f"<math {MATHML}") == wrapped, page.name
        formulas += wrapped
    assert formulas > 100


@pytest.mark.slow
def test_site_is_built_with_its_maths_and_fetches_nothing_elsewhere(tmp_path: Path) -> None:
    _hook()
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    site = tmp_path / "site"
    build = [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(site)]
    done = subprocess.run(build, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pages = {p.relative_to(site).as_posix(): p.read_text("utf-8") for p in site.rglob("*.html")}
    assert len(pages) > 20
    for name, text in pages.items():
        assert 'class="arithmatex">\\' not in text, f"{name} has maths left as LaTeX"
    gradcam = pages["methods/gradcam/index.html"]
    assert gradcam.count(f'<math {MATHML} display="block">') >= 1
    assert "<mtext>Grad-CAM</mtext>" in gradcam  # L^c_{\text{Grad-CAM}}
    assert sum(text.count("<math ") for text in pages.values()) > 100
    text_files = [*site.rglob("*.html"), *site.rglob("*.css"), *site.rglob("*.js")]
    external = {
        (f.relative_to(site).as_posix(), url)
        for f in text_files
        for m in FETCHED.finditer(f.read_text("utf-8", errors="replace"))
        for url in m.groups()
        if url and re.match(r"(https?:)?//", url)
    }
    assert not external, sorted(external)[:10]
