"""Every config key with its type, default, allowed range, resume policy and comment, read from the config
dataclasses (`kith.config`, each method's `Config`, `kith.utils.keys` metadata) and their source comments.

It backs `kith config --keys` and the generated page `docs/reference/config.md`:
`python -m kith.tools.config_reference --write` regenerates the page, `--check` exits 1 when it is out of
date (the test suite runs the check, so a new key cannot miss the page).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import sys
import tokenize
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from kith.config import Config, DataConfig, EvalConfig, TrainConfig
from kith.data.augment import ViewConfig, default_views
from kith.methods import METHODS
from kith.nn.backbones import BackboneConfig
from kith.utils.keys import NO_EFFECT, RESUMABLE, KeyMeta, Policy, key_meta

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "reference" / "config.md"

POLICY_WORDS = {
    Policy.FIXED: "no",
    RESUMABLE: "yes",
    NO_EFFECT: "yes (no effect on results)",
}
_NUMERIC = ("int", "float")


@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted, e.g. `train.lr` or `method.queue_size`
    type: str
    default: Any
    allowed: str
    resume: str
    comment: str


@lru_cache(maxsize=None)
def _comments(cls: type) -> dict[str, str]:
    """`field name -> comment` from the class's source: the comment on the field's line, else the
    comment lines just above it (a field declared across lines takes the comments of all its lines)."""
    try:
        lines, start = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    by_line: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        if tok.type == tokenize.COMMENT:
            by_line[tok.start[0]] = tok.string.lstrip("#").strip()
    found: dict[str, str] = {}
    names = set(cls.__dict__.get("__annotations__", {}))
    for number, text in enumerate(lines, start=1):
        name = text.strip().split(":", 1)[0]
        if name not in names or not text.startswith("    ") or text.startswith("     "):
            continue
        end = number
        while end < len(lines) and lines[end].startswith("        "):  # continuation lines
            end += 1
        own = [by_line[n] for n in range(number, end + 1) if n in by_line]
        above, n = [], number - 1
        while n in by_line and lines[n - 1].strip().startswith("#"):
            above.insert(0, by_line[n])
            n -= 1
        found[name] = " ".join(own or above)
    return found


def _comment(section: type, name: str) -> str:
    """The source comment of field `name`: from the nearest class of `section`'s MRO that declares the field
    with a comment (a method's config redeclares `name` with its own default, not its meaning)."""
    for cls in section.__mro__:
        if name in cls.__dict__.get("__annotations__", {}) and _comments(cls).get(name):
            return _comments(cls)[name]
    return ""


def _type_name(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    if text.startswith("Optional[") and text.endswith("]"):
        return f"{text[9:-1]} or null"
    return text


def _allowed(type_name: str, meta: KeyMeta, prefix: str) -> str:
    base = type_name.removesuffix(" or null")
    if meta.choices:
        text = "one of " + ", ".join(f"`{c}`" for c in meta.choices)
    elif base in _NUMERIC or base in ("list[int]", "list[float]"):
        text = str(meta.range) + (" (each item)" if base.startswith("list") else "")
    elif base == "bool":
        text = "`true` or `false`"
    else:
        text = "any"
    if meta.at_most:
        text += f", ≤ `{prefix}{meta.at_most}`"
    return text


def _default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def section_keys(section: Any, prefix: str, force_policy: Policy | None = None) -> list[KeyDoc]:
    """One `KeyDoc` per leaf field of dataclass instance `section`, recursing into dataclass fields.
    `force_policy`: for sections whose every key has one policy whatever the field says."""
    out = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.extend(section_keys(value, f"{prefix}{f.name}.", force_policy))
            continue
        if f.name in ("augment", "method"):  # documented per recipe and per method below
            continue
        meta = key_meta(type(section), f.name)
        type_name = _type_name(f.type)
        policy = meta.policy if force_policy is None else force_policy
        out.append(KeyDoc(f"{prefix}{f.name}", type_name, _default(value), _allowed(type_name, meta, prefix),
                          POLICY_WORDS[policy], _comment(type(section), f.name)))
    return out


def all_sections() -> list[tuple[str, str, list[KeyDoc]]]:
    """`(title, intro, keys)` for every section of the config tree, one per method."""
    top = [k for k in section_keys(Config(), "") if "." not in k.key]
    sections = [
        ("Top level", "Keys outside any section.", top),
        ("data", "Where the images come from and how they are held.", section_keys(DataConfig(), "data.")),
        ("backbone", "The encoder being trained.", section_keys(BackboneConfig(), "backbone.")),
        ("train", "Optimisation, schedule, precision, checkpoints and logging.",
         section_keys(TrainConfig(), "train.")),
        ("eval", "The online kNN monitor and the end-of-run evaluation.",
         section_keys(EvalConfig(), "eval.")),
        ("augment.&lt;recipe&gt;",
         "Each augmentation recipe (`augment.strong`, `augment.strong_solarize`, `augment.weak`, or one you "
         "add with its own name) has these keys; a method's `method.views` names the two it uses. The "
         "defaults below are `strong`'s; the other recipes differ as listed after the table. Every "
         "augmentation key is fixed for a run.",
         section_keys(ViewConfig(), "augment.<recipe>.", force_policy=Policy.FIXED)),
    ]
    for name, cls in sorted(METHODS.items()):
        summary = cls.summary.rstrip(".")
        intro = f"`method.name={name}`: {summary}. Page: [{name}](../methods/{name}.md). Every method " \
                "key is fixed for a run."
        sections.append((f"method ({name})", intro,
                         section_keys(cls.Config(), "method.", force_policy=Policy.FIXED)))
    return sections


def _cell(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (list, dict)) and not value:
        return f"`{value}`"
    text = str(value).replace("|", "\\|")
    return f"`{text}`"


def _recipe_differences() -> list[str]:
    views = default_views()
    strong = dataclasses.asdict(views["strong"])
    lines = []
    for name, view in views.items():
        diff = {k: v for k, v in dataclasses.asdict(view).items() if strong[k] != v}
        if diff:
            lines.append(f"- `{name}`: " + ", ".join(f"`{k}={v}`" for k, v in diff.items()))
    return lines


def _markdown_text(comment: str) -> str:
    """A source comment as a table cell: `|` would end the cell, and a placeholder such as `<model name>`
    outside backticks would be read as an HTML tag and vanish from the page."""
    parts = comment.replace("|", "/").split("`")
    parts[::2] = [s.replace("<", "&lt;") for s in parts[::2]]  # outside code spans
    return "`".join(parts)


def render_markdown() -> str:
    out = [
        "# Config keys",
        "",
        "<!-- generated by `python -m kith.tools.config_reference --write`: do not edit by hand -->",
        "",
        "Every key of the config tree, read from the config dataclasses. Set any of them on the command "
        "line as `section.key=value` (`kith pretrain train.lr=0.3`), in a preset, or as a keyword of "
        "`kith.pretrain` (`**{\"train.lr\": 0.3}`). `kith config --keys` prints the same list, and "
        "`kith config preset=... key=value` prints the resolved config of a run before starting it.",
        "",
        "- **allowed**: the range a number (or each item of a list) must lie in, or the choices; a value "
        "outside stops before anything runs, with one line naming the key.",
        "- **resume**: whether `kith pretrain --resume RUN_DIR key=value` may change the key. `yes` keys "
        "take effect from the resume on and are logged as a `resume` row of `metrics.jsonl`; `no` keys fix "
        "what the checkpoint holds or which batches and random draws a run replays, so a resume refuses "
        "to change them.",
        "",
    ]
    for title, intro, keys in all_sections():
        out += [f"## {title}", "", intro, "", "| key | type | default | allowed | resume | what |",
                "|---|---|---|---|---|---|"]
        for k in keys:
            out.append(f"| `{k.key}` | {k.type.replace('|', 'or')} | {_cell(k.default)} | {k.allowed} | "
                       f"{k.resume} | {_markdown_text(k.comment)} |")
        out.append("")
        if title.startswith("augment"):
            out += _recipe_differences() + [""]
    return "\n".join(out)


def render_text() -> str:
    """The plain-text list `kith config --keys` prints."""
    rows = []
    for _, _, keys in all_sections():
        for k in keys:
            comment = f"  # {k.comment}" if k.comment else ""
            rows.append(f"{k.key} = {k.default!r}   [{k.type}; {k.allowed}; resume: {k.resume}]{comment}")
    return "\n".join(rows).replace("`", "") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate or check docs/reference/config.md.")
    parser.add_argument("--write", action="store_true", help="rewrite the page")
    parser.add_argument("--check", action="store_true", help="exit 1 when the page is out of date")
    args = parser.parse_args(argv)
    text = render_markdown()
    if args.write:
        DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
        DOC_PATH.write_text(text)
        print(f"wrote {DOC_PATH}")
    if args.check:
        if not DOC_PATH.is_file() or DOC_PATH.read_text() != text:
            print(f"{DOC_PATH} is out of date: run python -m kith.tools.config_reference --write")
            return 1
        print(f"{DOC_PATH} is up to date")
    if not (args.write or args.check):
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
