"""The documentation's generated pages are up to date, and its links point at files that exist."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

from benchmarks import results_page
from kith.config import build_config
from kith.methods import METHODS
from kith.tools import config_reference

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1]


def test_config_reference_page_is_up_to_date():
    assert config_reference.DOC_PATH.read_text() == config_reference.render_markdown(), \
        "docs/reference/config.md is stale: python -m kith.tools.config_reference --write"


def test_config_reference_lists_every_key_of_every_method():
    documented = {k.key for _, _, keys in config_reference.all_sections() for k in keys}
    for name in METHODS:
        cfg = OmegaConf.to_container(build_config([f"method={name}"]))
        cfg.pop("reference")
        for key in _leaves(cfg):
            if key.startswith("augment."):
                key = "augment.<recipe>." + key.split(".", 2)[2]
            assert key in documented or key == "reference", f"{key} ({name}) is missing from the reference"


def test_every_config_key_has_a_comment():
    """The reference's last column is the field's source comment: a key without one is undocumented."""
    bare = [k.key for title, _, keys in config_reference.all_sections() for k in keys if not k.comment]
    assert not bare, f"config keys without a comment on their field: {bare}"


def test_config_reference_takes_the_comment_and_policy_from_the_field():
    keys = {k.key: k for _, _, ks in config_reference.all_sections() for k in ks}
    assert keys["train.batch_size"].comment == "global batch (all ranks together)"
    assert keys["train.batch_size"].resume == "no" and keys["train.lr"].resume == "yes"
    assert keys["data.decode"].allowed == "one of `cpu`, `gpu`"
    assert "≤ `method.queue_size`" in keys["method.num_neighbours"].allowed


def test_results_page_is_up_to_date():
    assert results_page.DOC_PATH.read_text() == results_page.render(), \
        "docs/results.md is stale: python -m benchmarks.results_page --write"
    assert results_page.README.read_text() == results_page.readme_text(), \
        "the README's results table is stale: python -m benchmarks.results_page --write"


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
    return LINK.findall(text)


def test_readme_links_stay_inside_the_repository():
    for name in ("README.md", "CHANGELOG.md"):
        for target in _links(ROOT / name):
            assert not re.match(r"[a-z]+:", target), f"{name} links outside the repository: {target}"
            file = (ROOT / target.split("#")[0]).resolve()
            assert file.is_relative_to(ROOT) and file.exists(), f"{name}: broken link {target}"
    assert "../shared" not in (ROOT / "README.md").read_text()


def test_docs_links_and_images_exist():
    for page in (ROOT / "docs").rglob("*.md"):
        for target in _links(page):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            file = (page.parent / target.split("#")[0]).resolve()
            assert file.exists(), f"{page.relative_to(ROOT)}: broken link {target}"


def test_speed_guide_kernel_counts_match_the_recorded_json():
    """The kernel-count table of the speed guide is copied from benchmarks/results/kernel_count.json:
    when the JSON is recorded again, the table must follow."""
    import json

    recorded = json.loads((ROOT / "benchmarks/results/kernel_count.json").read_text())["methods"]
    text = (ROOT / "docs/guides/speed.md").read_text()
    table = text.split("| method | augment | augment (GPU branch) | step |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.strip().splitlines()[1:]:
        name, *counts = (cell.strip() for cell in line.strip("|").split("|"))
        rows[name.split(" ")[0]] = tuple(int(c.replace(",", "")) for c in counts)
    assert rows == {m: (v["augment"], v["augment_gpu"], v["step"]) for m, v in recorded.items()}, \
        "docs/guides/speed.md's kernel table differs from benchmarks/results/kernel_count.json"


def test_ci_runs_the_readme_test_command_then_builds_the_site():
    """CI installs what the README's test command installs (no docs extra) before pytest, so the command
    stays true, and builds the site with warnings as errors only after the tests."""
    readme = (ROOT / "README.md").read_text()
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert 'pip install -e ".[dev]" && pytest' in readme
    install, tests = ci.index('pip install -e ".[dev]"'), ci.index("pytest")
    docs = ci.index('pip install -e ".[docs]"')
    build = next(i for i, line in enumerate(ci) if line.startswith("mkdocs build --strict"))
    assert install < tests < docs < build


def test_config_reference_shows_placeholders_in_comments():
    """A comment's `<model name>` outside backticks would be an HTML tag to Markdown and vanish."""
    page = config_reference.render_markdown()
    for line in page.splitlines():
        if line.startswith("<!--"):  # the generator's own HTML comment
            continue
        outside_code = "".join(line.split("`")[::2])
        assert "<" not in outside_code, f"a raw '<' in the config reference: {line}"
    assert "timm:&lt;model name>" in page


def test_overlines_span_their_whole_base():
    """The docs' MathML hook turns \\overline{...} into a bordered row (browsers do not stretch the accent);
    nested overlines keep their nesting and \\bar stays an accent."""
    import importlib.util

    import pytest

    pytest.importorskip("latex2mathml")  # the docs extra
    spec = importlib.util.spec_from_file_location("mkdocs_mathml", ROOT / "scripts/mkdocs_mathml.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    out = hook._to_mathml(r"\overline{g(\overline{b})} + \bar{c}", "inline", "page.md")
    assert out.count('<mrow class="overline">') == 2 and "&#x02015;" not in out
    assert out.index('class="overline"><mrow><mi>g') < out.index('class="overline"><mrow><mi>b')
    assert "&#x000AF;" in out  # \bar{c}
