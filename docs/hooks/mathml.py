"""MkDocs hook: render the site's LaTeX maths to MathML when the site is built.

``pymdownx.arithmatex`` (generic mode) wraps ``$...$`` in ``<span class="arithmatex">\\(...\\)</span>``
and ``$$...$$`` in ``<div class="arithmatex">\\[...\\]</div>``. This hook converts both to
MathML with ``latex2mathml``, which browsers render natively: the pages need no JavaScript
and no network to show their equations (the site is read offline, and its screenshots are
taken offline). A formula that ``latex2mathml`` cannot convert fails the build, naming the
page and the formula, rather than leaving raw LaTeX on the page.
"""

from __future__ import annotations

import html
import re

from latex2mathml.converter import convert

_INLINE = re.compile(r'<span class="arithmatex">\\\((.*?)\\\)</span>', re.S)
_BLOCK = re.compile(r'<div class="arithmatex">\\\[(.*?)\\\]</div>', re.S)


def _render(latex: str, display: str, page) -> str:
    source = html.unescape(latex).strip()
    try:
        return convert(source, display=display)
    except Exception as e:  # any parse failure: say where
        raise ValueError(f"{page.file.src_path}: cannot render the formula {source!r} to MathML: {e}") from e


def on_page_content(content: str, page, config, files) -> str:
    content = _BLOCK.sub(lambda m: _render(m.group(1), "block", page), content)
    return _INLINE.sub(lambda m: _render(m.group(1), "inline", page), content)
