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


# ---- any key, any seeds ------------------------------------------------------------------
def test_kith_study_sweeps_a_key_over_seeds_end_to_end(tmp_path, capsys):
    from kith.cli import main
    from tests.helpers import small_heads

    overrides = [o for o in TINY if not o.startswith(("train.knn_every", "train.epochs"))]
    overrides += ["train.knn_every=0", "train.epochs=1", *small_heads("msf")]
    out = tmp_path / "msf-k"
    argv = ["study", "--key", "method.k", "--values", "1,3", "--seeds", "0,1", "--methods", "msf",
            "--out", str(out), *overrides]
    assert main(argv) == 0
    study = json.loads((out / "study.json").read_text())
    names = [r["name"] for r in study["runs"]]
    assert names == ["msf-k1-s0", "msf-k1-s1", "msf-k3-s0", "msf-k3-s1"]
    assert "k: 3" in (out / "msf-k3-s1" / "config.yaml").read_text()
    assert "seed: 1" in (out / "msf-k3-s1" / "config.yaml").read_text()
    entries = {e["setting"]: e for e in study["settings"]}
    assert set(entries) == {"k1", "k3"} and all(e["knn"]["n"] == 2 and e["seeds"] == [0, 1]
                                                for e in entries.values())
    runs = {r["name"]: r["knn"]["5"] for r in study["runs"]}
    assert entries["k3"]["knn"]["mean"] == pytest.approx((runs["msf-k3-s0"] + runs["msf-k3-s1"]) / 2)
    assert png_size(out / "study.png")[0] > 100
    table = capsys.readouterr().out
    assert "| msf |" in table and " ± " in table and "(n=2)" in table and "seeds: 0, 1" in table
    assert main(argv) == 0  # everything done: all four skipped
    assert [r["status"] for r in json.loads((out / "study.json").read_text())["runs"]] == ["skipped"] * 4


def test_mean_and_sample_std_per_setting():
    from kith.tools.study import aggregate, mean_std

    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert mean_std([4.0]) == {"mean": 4.0, "std": None, "n": 1}

    def run(setting, seed, knn):
        return {"method": "msf", "setting": setting, "value": setting, "seed": seed,
                "knn": {} if knn is None else {"20": knn, "200": knn}, "knn_random_init": {"200": 10.0},
                "online_linear_top1": None}

    entries = aggregate([run("a", 0, 50.0), run("a", 1, 54.0), run("b", 0, 60.0), run("b", 1, None)])
    assert [e["setting"] for e in entries] == ["a", "b"] and entries[0]["k"] == "200"
    assert entries[0]["knn"] == {"mean": 52.0, "std": pytest.approx(2 ** 1.5), "n": 2}
    assert entries[1]["knn"]["n"] == 1 and entries[1]["seeds"] == [0]  # an unfinished seed is left out
    assert entries[0]["knn_random_init"]["mean"] == 10.0


def test_study_values_and_plan_errors():
    from kith.tools.study import plan, split_values
    from kith.utils.errors import UserError

    assert split_values("1,5") == ["1", "5"]
    assert split_values("[weak,weak],[strong,weak]") == ["[weak,weak]", "[strong,weak]"]
    runs = plan(None, [], ["[weak,weak]"], ["method.name=byol", "train.epochs=1"], key="method.views")
    assert runs[0]["name"] == "byol-views_weak_weak" and runs[0]["seed"] is None
    for kwargs in ({"kind": "dim", "key": "method.k"}, {"kind": None}, {"kind": None, "key": "seed"},
                   {"kind": None, "key": "method.k", "values": None},
                   {"kind": "dim", "seeds": [0, 0]}):
        with pytest.raises(UserError):
            plan(methods=["simclr"], **{"values": ["1"], **kwargs})
