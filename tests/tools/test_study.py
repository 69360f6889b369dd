"""The study runner: resuming a study after an interruption, the weak-augmentation plan."""

from __future__ import annotations

import json

import pytest

from tests.helpers import TINY, png_size


# ---- study ------------------------------------------------------------------------------
def test_study_resumes_after_interruption(tmp_path, monkeypatch):
    from kith.tools import study

    overrides = [o for o in TINY if not o.startswith("train.knn_every")] + ["train.knn_every=0"]
    out = tmp_path / "dim"
    real = study.run_training
    calls = []

    def flaky(cfg, run_dir=None, resume=False, **kw):
        calls.append((run_dir.name, resume))
        if len(calls) == 2:  # the second run dies after its first epoch, leaving a checkpoint
            real(cfg, run_dir=run_dir, stop_after_epoch=1)
            raise KeyboardInterrupt
        return real(cfg, run_dir=run_dir, resume=resume, **kw)

    monkeypatch.setattr(study, "run_training", flaky)
    with pytest.raises(KeyboardInterrupt):
        study.run_study("dim", ["simclr"], out, values=[8, 16], overrides=overrides, log=lambda *_: None)
    assert calls == [("simclr-dim8", False), ("simclr-dim16", False)]
    assert (out / "simclr-dim16" / "checkpoints" / "last.pt").is_file()
    assert json.loads((out / "study.json").read_text())["runs"][0]["status"] == "trained"

    calls.clear()
    result = study.run_study("dim", ["simclr"], out, values=[8, 16], overrides=overrides, log=lambda *_: None)
    assert calls == [("simclr-dim16", True)]  # the first was skipped, the second resumed
    assert [r["status"] for r in result["runs"]] == ["skipped", "resumed"]
    assert all(r["knn"] for r in result["runs"])
    assert "proj_output_dim: 16" in (out / "simclr-dim16" / "config.yaml").read_text()
    assert (out / "study.md").read_text().count("| simclr |") == 1
    assert png_size(out / "study.png")[0] > 100
    calls.clear()
    study.run_study("dim", ["simclr"], out, values=[8, 16], overrides=overrides, log=lambda *_: None)
    assert calls == []  # everything done: nothing trains

def test_study_weak_aug_plan():
    from kith.tools.study import plan

    runs = plan("weak-aug", ["byol"], overrides=["train.epochs=1"])
    assert [r["name"] for r in runs] == ["byol-strong", "byol-weak"]
    assert runs[1]["overrides"][-1] == "method.views=[weak,weak]"
    from kith.config import build_config

    assert list(build_config(runs[1]["overrides"]).method.views) == ["weak", "weak"]
