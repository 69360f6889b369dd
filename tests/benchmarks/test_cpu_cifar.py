"""The CPU protocol's bookkeeping: which budget keys each method gets, that every setting builds a valid
config from its preset, the per-setting mean ± std with gains paired by seed, the results page drawn from
it, and a clear skip without the data."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from benchmarks import cpu_cifar, epoch_gains, neighbour_curves, results_page
from benchmarks.claims import CLAIMS, verdicts
from kith.config import build_config
from kith.methods import METHODS


def test_budget_keeps_only_keys_the_method_has_and_method_entries_win():
    simclr = dict(item.split("=", 1) for item, _ in cpu_cifar.budget_overrides("simclr"))
    assert "method.pred_hidden_dim" not in simclr and "method.queue_size" not in simclr  # SimCLR has neither
    assert simclr["method.proj_hidden_dim"] == "512"
    barlow = [item for item, _ in cpu_cifar.budget_overrides("barlow_twins")]
    assert [i for i in barlow if i.startswith("method.proj_output_dim=")] == ["method.proj_output_dim=512"]
    assert all(reason for _, reason in cpu_cifar.budget_overrides("ressl"))  # every override says why


@pytest.mark.parametrize("setting", list(cpu_cifar.SETTINGS))
def test_every_setting_builds_its_config_from_its_preset(setting, tmp_path):
    cfg = build_config(cpu_cifar.run_overrides(setting, 1, tmp_path))
    method, studied = cpu_cifar.SETTINGS[setting]
    assert cfg.method.name == method and cfg.seed == 1 and cfg.data.size == 16
    assert cfg.preset == f"cifar10/{method}"
    if "+crops" in setting:
        assert len(cfg.method.extra_views) == 4


def _run(setting: str, seed: int, knn: float, linear: float) -> dict:
    return {"setting": setting, "method": setting.split("+")[0], "seed": seed, "epochs": 2, "knn@20": knn,
            "knn@200": knn, "linear_top1": linear, "images_per_s": 100.0 + seed, "wall_time_s": 60.0,
            "load_average_before": 1.0, "load_average_after": 2.0, "num_test": 10, "date": "2026-12-03T00:00"}


def test_summary_is_mean_and_std_over_seeds_with_gains_paired_by_seed():
    knn = [(0, 40.0), (1, 44.0), (2, 39.0)]
    doc = {"runs": {f"byol/seed{s}": _run("byol", s, k, k + 10) for s, k in knn},
           "random_init": {str(s): {"knn@200": r, "linear_top1": r + 5} for s, r in [(0, 30.0), (1, 36.0),
                                                                                   (2, 33.0)]}}
    row = cpu_cifar.summarise(doc)["byol"]
    assert row["seeds"] == [0, 1, 2]
    assert row["knn@200"]["mean"] == pytest.approx(41.0)
    assert row["knn@200"]["std"] == pytest.approx(statistics.stdev([40.0, 44.0, 39.0]))
    gains = [10.0, 8.0, 6.0]  # per seed, against that seed's own random-init network
    assert row["gain_knn@200"]["mean"] == pytest.approx(8.0)
    assert row["gain_knn@200"]["std"] == pytest.approx(statistics.stdev(gains))
    assert row["gain_linear_top1"]["mean"] == pytest.approx(13.0)  # (knn + 10) - (random + 5)


def test_results_page_shows_mean_std_random_init_and_the_paired_multicrop_gain(monkeypatch, tmp_path):
    runs = {}
    for s, (base, crops) in enumerate([(40.0, 42.0), (41.0, 44.0), (39.0, 40.0)]):
        runs[f"byol/seed{s}"] = _run("byol", s, base, 50.0)
        runs[f"byol+crops/seed{s}"] = _run("byol+crops", s, crops, 51.0)
    doc = {"runs": runs, "random_init": {str(s): {"knn@200": 30.0, "linear_top1": 45.0} for s in range(3)},
           "protocol": cpu_cifar.protocol_doc(), "torch_version": "x", "cpu_count": 2, "platform": "Linux-x"}
    doc["summary"] = cpu_cifar.summarise(doc)
    (tmp_path / "cpu_cifar.json").write_text(json.dumps(doc))
    (tmp_path / "cpu_cifar_v1.json").write_text(json.dumps({"methods": {}}))
    monkeypatch.setattr(results_page, "RESULTS", tmp_path)
    page = "\n".join(results_page._cpu_cifar())
    assert "| byol | 3 | 40.00 ± 1.00 | 50.00 ± 0.00 | +10.00 ± 1.00 |" in page
    assert "| random init | 3 | 30.00 ± 0.00 |" in page
    assert "+2.00 ± 1.00" in page  # crops - base per seed: 2, 3, 1
    assert "`data.size=16`" in page  # every budget override is listed with its reason


def test_the_epoch_tries_say_at_how_many_epochs_each_method_below_the_bar_clears_it(monkeypatch, tmp_path):
    # byol: +2 at 2 epochs, +4 at 4, +6 at 6 (clears at 6); msf: +1, then +3 at 4 (still below)
    runs = {}
    for s in range(3):
        for setting, epochs, knn in (("byol", 2, 32.0), ("byol (4 epochs)", 4, 34.0),
                                     ("byol (6 epochs)", 6, 36.0), ("msf", 2, 31.0),
                                     ("msf (4 epochs)", 4, 33.0), ("msf (k=1)", 2, 45.0)):
            run = _run(setting, s, knn + s, 50.0)
            runs[f"{setting}/seed{s}"] = {**run, "method": setting.split(" ")[0], "epochs": epochs,
                                          "wall_time_s": 30.0 * epochs}
    doc = {"runs": runs, "protocol": cpu_cifar.protocol_doc(),
           "random_init": {str(s): {"knn@200": 30.0 + s, "linear_top1": 45.0} for s in range(3)}}
    doc["summary"] = cpu_cifar.summarise(doc)
    assert {m: [r["epochs"] for r in rows] for m, rows in epoch_gains.by_method(doc).items()} == \
        {"byol": [2, 4, 6], "msf": [2, 4]}  # msf (k=1) studies a key: not an epoch try
    (tmp_path / "cpu_cifar.json").write_text(json.dumps(doc))
    monkeypatch.setattr(results_page, "RESULTS", tmp_path)
    sentence = results_page._epochs_sentence(doc, ["byol", "msf"])
    assert "clearing it, byol at 6 (+6.0, 3 seeds, 3.0 min a run)" in sentence
    assert "still below, msf not by 4 (+3.0, 3 seeds, 2.0 min a run)" in sentence
    everyone = results_page._epochs_sentence(doc, ["byol"])
    assert "every one of them clears it: byol at 6" in everyone and "training length" in everyone
    section = "\n".join(epoch_gains.section(doc))
    assert "| byol | +2.00 ± 0.00 (3 seeds, 1.0 min) | +4.00 ± 0.00 (3 seeds, 2.0 min) |" in section
    assert epoch_gains.plot(doc, tmp_path / "gains.png") and (tmp_path / "gains.png").stat().st_size > 0


def test_without_the_data_it_says_so_and_writes_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cpu_cifar, "DATA_DIR", tmp_path / "cache")
    monkeypatch.setattr(cpu_cifar, "RESULTS", tmp_path / "results")
    assert cpu_cifar.main(["--settings", "byol", "--seeds", "0", "--pack", str(tmp_path / "none.npz")]) == 0
    assert "not found" in capsys.readouterr().out
    assert not (tmp_path / "results").exists()


def test_unknown_setting_is_refused_with_the_known_ones(capsys):
    assert cpu_cifar.main(["--settings", "bylo"]) == 2
    err = capsys.readouterr().err
    assert "bylo" in err and all(m in err for m in METHODS)


def test_the_published_results_hold_every_run_the_summary_counts():
    path = Path(cpu_cifar.RESULTS) / "cpu_cifar.json"
    doc = json.loads(path.read_text())
    assert doc["summary"] == cpu_cifar.summarise(doc)
    assert doc["claims"] == verdicts(doc["runs"])


def test_every_claim_compares_settings_of_the_protocol():
    for claim in CLAIMS:
        for comparison in claim.comparisons:
            assert set(comparison.settings) <= set(cpu_cifar.SETTINGS), comparison.label


def _claim_runs(**knn_by_setting: list[float]) -> dict:
    return {f"{name}/seed{s}": {"setting": name, "seed": s, "knn@200": v}
            for name, values in knn_by_setting.items() for s, v in enumerate(values)}


def _verdict_of(claim_index: int, runs: dict) -> dict:
    return verdicts(runs)[claim_index]


MSF_K = next(i for i, c in enumerate(CLAIMS) if "k=5" in c.claim)
ALL4ONE_DIM = next(i for i, c in enumerate(CLAIMS) if "dimension" in c.claim)
RESSL_T = next(i for i, c in enumerate(CLAIMS) if "temperature" in c.claim)


def test_a_claim_holding_on_every_seed_beyond_its_interval_is_reproduced():
    v = _verdict_of(MSF_K, _claim_runs(**{"msf": [40.0, 41.0, 42.0], "msf (k=1)": [38.0, 38.9, 40.1]}))
    (row,) = v["comparisons"]
    assert row["per_seed"] == {"0": 2.0, "1": 2.1, "2": 1.9}
    half = 4.303 * statistics.stdev([2.0, 2.1, 1.9]) / 3**0.5  # t(0.975, 2) standard errors
    assert row["low"] == pytest.approx(2.0 - half) and row["high"] == pytest.approx(2.0 + half)
    assert v["verdict"] == "reproduced"


def test_a_noisy_a_reversed_an_unmeasured_and_a_one_seed_claim():
    noisy = _claim_runs(**{"msf": [40.0, 41.0, 42.0], "msf (k=1)": [39.0, 42.0, 41.5]})
    assert _verdict_of(MSF_K, noisy)["verdict"] == "inconclusive"
    reversed_ = _claim_runs(**{"msf": [40.0, 41.0, 42.0], "msf (k=1)": [42.0, 43.1, 43.9]})
    assert _verdict_of(MSF_K, reversed_)["verdict"] == "not reproduced"
    assert _verdict_of(MSF_K, {})["verdict"] == "not measured yet"
    one_seed = _claim_runs(**{"msf": [40.0], "msf (k=1)": [30.0]})
    assert _verdict_of(MSF_K, one_seed)["verdict"] == "inconclusive"


def test_a_claimed_margin_must_be_cleared_by_every_comparison():
    runs = _claim_runs(**{"all4one (dim 32)": [50.0, 51.0, 52.0], "nnclr (dim 32)": [40.0, 41.0, 42.1],
                          "barlow_twins (dim 32)": [47.0, 48.1, 48.9]})
    assert _verdict_of(ALL4ONE_DIM, runs)["verdict"] == "reproduced in direction"  # +3 over Barlow, not +5
    runs.update(_claim_runs(**{"barlow_twins (dim 32)": [40.0, 41.1, 41.9]}))
    assert _verdict_of(ALL4ONE_DIM, runs)["verdict"] == "reproduced"


def test_temperature_sensitivity_compares_how_far_each_variant_moves():
    runs = _claim_runs(**{"ressl": [40.0, 41.0, 42.0], "ressl (t_teacher 0.07)": [39.5, 40.4, 41.6],
                          "ressl (plain)": [40.0, 41.0, 42.0],
                          "ressl (plain; t_teacher 0.07)": [36.0, 37.1, 37.9]})
    (row,) = _verdict_of(RESSL_T, runs)["comparisons"]
    assert row["per_seed"] == pytest.approx({"0": 3.5, "1": 3.3, "2": 3.7})  # |plain moves| - |full moves|


def test_neighbour_curves_keep_each_train_row_of_the_metrics_a_method_logs(tmp_path):
    rows = [{"kind": "start", "step": 0}, {"kind": "train", "step": 10, "nn_acc": 0.123456, "loss": 1.0},
            {"kind": "eval", "step": 10, "nn_acc": 0.9}, {"kind": "train", "step": 20, "nn_acc": 0.25}]
    assert cpu_cifar.neighbour_curves(rows) == {"nn_acc": [[10, 0.1235], [20, 0.25]]}
    assert cpu_cifar.neighbour_curves([{"kind": "train", "step": 10, "loss": 1.0}]) == {}  # SimCLR: none
    doc = {"runs": {f"msf/seed{s}": {"setting": "msf", "method": "msf",
                                     "curves": {"purity": [[10, 0.2], [20, 0.3 + s / 10]]}}
                    for s in range(2)}}
    assert neighbour_curves.plot(doc, tmp_path / "curves.png") and (tmp_path / "curves.png").stat().st_size
    # the last value, smoothed over the 2 rows, then averaged over seeds: ((0.2+0.3)/2 + (0.2+0.4)/2) / 2
    assert "msf 27.5% (purity)" in neighbour_curves.section(doc)[2]


def test_the_bar_sentence_lists_what_was_tried_for_a_method_below_it(monkeypatch, tmp_path):
    runs = {f"byol/seed{s}": _run("byol", s, 32.0 + s, 50.0) for s in range(3)}
    runs["byol (batch 64)/seed0"] = {**_run("byol", 0, 34.5, 50.0), "setting": "byol (batch 64)"}
    doc = {"runs": runs, "random_init": {str(s): {"knn@200": 30.0, "linear_top1": 45.0} for s in range(3)},
           "protocol": {**cpu_cifar.protocol_doc(), "bar_tries": ["byol (batch 64)"]}}
    doc["summary"] = cpu_cifar.summarise(doc)
    (tmp_path / "cpu_cifar.json").write_text(json.dumps(doc))
    monkeypatch.setattr(results_page, "RESULTS", tmp_path)
    text = results_page._bar_sentence()
    assert "byol +3.0 do not" in text  # gains 2, 3, 4 over random init
    assert "`byol (batch 64)` +4.5 (1 seed; +2.5 against byol on the same seeds)" in text
