"""User-facing errors: the CLI prints these as one line, without a traceback, and exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake in the user's input (path, config key, data); the message says how to fix it.

    Always one line: a newline inside it (from a user's value, a file name) is shown as `\\n`."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(a.replace("\r", "\\r").replace("\n", "\\n") if isinstance(a, str) else a
                           for a in args))


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most similar to `name`, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest candidate, or '' when nothing is close."""
    match = closest(name, candidates)
    return f" (did you mean '{match}'?)" if match else ""


def check_choice(key: str, value: object, allowed: Iterable[str]) -> None:
    """UserError `key=value is not one of a, b (did you mean 'a'?)` unless `value` is in `allowed`."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise UserError(f"{key}={value} is not one of {', '.join(allowed)}"
                        f"{did_you_mean(str(value), allowed)}")


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type name when the message is empty), cut to
    `limit` characters: what a one-line user error quotes of a library's multi-line message."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:limit] if limit else line


def one_line(exc: BaseException) -> str:
    """An error's message on one line (a library's newlines joined), as the CLI prints it."""
    return " ".join(str(exc).split("\n")).strip() or type(exc).__name__
