import io
import sys

from kith.utils.progress import show_progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # stderr redirected to a file: no \r redraws in it
    assert not show_progress(True)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert show_progress(True) and not show_progress(False)
