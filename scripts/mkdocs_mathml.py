"""MkDocs hook: turn the LaTeX that `pymdownx.arithmatex` marks (`generic: true`) into MathML at build time.

Browsers render MathML natively, so the site needs no JavaScript and no math font from elsewhere: the
pages read the same offline, from a clone, as served. A formula latex2mathml cannot convert stops the
build with the page and the formula (a warning under `mkdocs build --strict`).
"""

from __future__ import annotations

import html
import logging
import re

from latex2mathml.converter import convert

log = logging.getLogger("mkdocs.plugins.kith_mathml")

# arithmatex's generic output: <span class="arithmatex">\(...\)</span>, <div class="arithmatex">\[...\]</div>
_BLOCK = re.compile(r'<div class="arithmatex">\\\[(.*?)\\\]</div>', re.S)
_INLINE = re.compile(r'<span class="arithmatex">\\\((.*?)\\\)</span>', re.S)


def _to_mathml(tex: str, display: str, page: str) -> str:
    tex = html.unescape(tex).strip()
    try:
        return convert(tex, display=display)
    except Exception as exc:  # latex2mathml raises several exception types for unsupported input
        log.warning("%s: cannot render formula %r: %s", page, tex, exc)
        return html.escape(tex)


def on_page_content(content: str, page, config, files) -> str:
    name = page.file.src_path
    content = _BLOCK.sub(lambda m: f'<div class="math">{_to_mathml(m.group(1), "block", name)}</div>',
                         content)
    return _INLINE.sub(lambda m: _to_mathml(m.group(1), "inline", name), content)
