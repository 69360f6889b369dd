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


def _train_with_stderr(monkeypatch, tmp_path, stderr) -> str:
    from kith.train.loop import run_training
    from tests.helpers import small_heads, tiny_config

    monkeypatch.setattr(sys, "stderr", stderr)
    cfg = tiny_config("simclr", *small_heads("simclr"), "train.progress=true", "train.epochs=1",
                      "train.knn_every=0", "train.device=cpu", out_dir=tmp_path)
    run_training(cfg, run_dir=tmp_path / "run", final_eval=False)
    return stderr.getvalue()


def test_training_bar_only_on_a_terminal(monkeypatch, tmp_path):
    # stderr into a log file: no epoch bar, so no carriage-return redraws in the log
    logged = _train_with_stderr(monkeypatch, tmp_path / "log", io.StringIO())
    assert "epoch 1/1" not in logged and "\r" not in logged
    # on a terminal the bar that train.progress asks for is drawn
    assert "epoch 1/1" in _train_with_stderr(monkeypatch, tmp_path / "tty", _Terminal())
