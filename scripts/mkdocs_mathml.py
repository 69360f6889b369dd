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


# latex2mathml writes \overline{x} as <mover>x<mo accent="true">&#x02015;</mo></mover>; browsers do not
# stretch that accent over a wide base (Chromium draws a short dash over one letter), so the base becomes
# an <mrow class="overline">, drawn with a top border by docs/stylesheets/extra.css.
_OVERLINE_END = '<mo accent="true">&#x02015;</mo></mover>'
_MOVER = re.compile(r"</?mover>")


def _overlines(mathml: str) -> str:
    while (end := mathml.find(_OVERLINE_END)) >= 0:
        depth = 0
        for tag in reversed(list(_MOVER.finditer(mathml, 0, end))):  # the <mover> this accent closes
            if tag.group() == "</mover>":
                depth += 1
            elif depth:
                depth -= 1
            else:
                break
        else:
            return mathml  # unbalanced: leave it as latex2mathml wrote it
        mathml = (mathml[:tag.start()] + '<mrow class="overline">' + mathml[tag.end():end] + "</mrow>"
                  + mathml[end + len(_OVERLINE_END):])
    return mathml


def _to_mathml(tex: str, display: str, page: str) -> str:
    tex = html.unescape(tex).strip()
    try:
        return _overlines(convert(tex, display=display))
    except Exception as exc:  # latex2mathml raises several exception types for unsupported input
        log.warning("%s: cannot render formula %r: %s", page, tex, exc)
        return html.escape(tex)


def on_page_content(content: str, page, config, files) -> str:
    name = page.file.src_path
    content = _BLOCK.sub(lambda m: f'<div class="math">{_to_mathml(m.group(1), "block", name)}</div>',
                         content)
    return _INLINE.sub(lambda m: _to_mathml(m.group(1), "inline", name), content)
