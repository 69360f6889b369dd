import json

import pytest
import torch

from kith import api
from kith.cli import main
from kith.methods import METHODS
from kith.methods.simclr import SimCLR
from kith.runs.checkpoint import CHECKPOINT
from kith.runs.metrics import read_metrics
from kith.train.loop import run_training
from kith.utils.errors import UserError
from tests.helpers import tiny_config


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_two_epoch_run(tmp_path, method):
    cfg = tiny_config(method, "method.proj_hidden_dim=32", "method.proj_output_dim=16", out_dir=tmp_path)
    result = run_training(cfg, run_dir=tmp_path / "run")
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.pt").is_file()
    assert not list(run.rglob("*.tmp"))
    assert (run / "config.yaml").is_file()
    rows = read_metrics(run)
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) == 4  # 64 images / batch 32 = 2 steps, 2 epochs, logged every step
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_rows)
    assert any(r["kind"] == "knn" for r in rows)
    assert set(result.knn) == {5} and set(result.knn_random_init) == {5}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["method"] == method
    if method == "byol":
        assert "tau" in train_rows[0] and train_rows[0]["tau"] < train_rows[-1]["tau"]


def test_nan_loss_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Epoch 1 writes a checkpoint; the loss turns NaN at the first step of epoch 2: the run stops
    with a clear error and the epoch-1 checkpoint is still there, unchanged."""
    cfg = tiny_config("simclr", "method.proj_hidden_dim=32", "train.knn_every=0", out_dir=tmp_path)
    good = run_training(cfg, run_dir=tmp_path / "good", stop_after_epoch=1, final_eval=False)
    steps_per_epoch = good.method.info.steps_per_epoch
    real_step = SimCLR.training_step

    def diverging(self, views, batch, step):
        loss, metrics = real_step(self, views, batch, step)
        return (loss * float("nan") if step.step >= steps_per_epoch else loss), metrics

    monkeypatch.setattr(SimCLR, "training_step", diverging)
    with pytest.raises(UserError, match="loss became nan by step 3 .*last good checkpoint is kept"):
        run_training(cfg, run_dir=tmp_path / "run")
    assert not list((tmp_path / "run").rglob("*.tmp"))
    kept = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=False)
    want = torch.load(tmp_path / "good" / CHECKPOINT, weights_only=False)
    assert (kept["epoch"], kept["step"]) == (1, steps_per_epoch)
    for key, value in want["method"].items():
        assert torch.equal(kept["method"][key], value), key  # the epoch-1 weights, not NaN


def test_resume_without_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        run_training(tiny_config("simclr"), run_dir=tmp_path / "nothing", resume=True)


def test_load_backbone_and_cli_eval(tmp_path, capsys):
    cfg = tiny_config("simclr", "method.proj_hidden_dim=32", out_dir=tmp_path)
    run_training(cfg, run_dir=tmp_path / "run")
    backbone = api.load_backbone(tmp_path / "run")
    assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, 64)
    assert main(["eval", str(tmp_path / "run"), "--k", "5"]) == 0
    assert "kNN@5" in capsys.readouterr().out
    assert read_metrics(tmp_path / "run")[-1]["kind"] == "eval"


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    assert main(["pretrain", "train.epoch=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'train.epochs'" in err
    assert main(["eval", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    missing = tmp_path / "missing"
    assert main(["pretrain", "data.name=folder", f"data.path={missing}", f"out_dir={tmp_path}"]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_methods_lists_registered(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, cls in METHODS.items():  # every registered method, with its one-line summary
        assert name in out and cls.summary and cls.summary in out


def test_tensorboard_logger_or_clear_error(tmp_path):
    cfg = tiny_config("simclr", "train.epochs=1", "train.logger=tensorboard", "method.proj_hidden_dim=32",
                      out_dir=tmp_path)
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"pip install tensorboard \(the log extra\)"):
            run_training(cfg, run_dir=tmp_path / "run", final_eval=False)
    else:
        run_training(cfg, run_dir=tmp_path / "run", final_eval=False)
        assert list((tmp_path / "run" / "tensorboard").iterdir())


def test_python_api_pretrain_and_resume(tmp_path):
    import kith
    from tests.helpers import TINY

    overrides = dict(item.split("=", 1) for item in TINY)
    overrides.update({"method.name": "nnclr", "method.queue_size": 64, "method.proj_hidden_dim": 32,
                      "method.pred_hidden_dim": 32, "train.epochs": 2})
    result = kith.pretrain(run_dir=tmp_path / "run", **overrides)
    assert result.epochs == 2 and set(result.knn) == {5}
    assert kith.evaluate(tmp_path / "run", ks=[5])[5] == pytest.approx(result.knn[5])
    again = kith.pretrain(run_dir=tmp_path / "run", resume=True, **{"train.epochs": 3})
    assert again.epochs == 3
