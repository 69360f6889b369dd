import json

import pytest
import torch

from kith import api
from kith.cli import main
from kith.errors import UserError
from kith.run import read_metrics
from kith.train import run_training
from tests.conftest import tiny_config


def _train_losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r.get("kind") == "train"]


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


def test_resume_gives_the_same_next_losses(tmp_path):
    overrides = ("method.proj_hidden_dim=32", "method.proj_output_dim=16", "method.pred_hidden_dim=32")
    full = tiny_config("byol", *overrides, out_dir=tmp_path)
    run_training(full, run_dir=tmp_path / "full")
    run_training(full, run_dir=tmp_path / "split", stop_after_epoch=1)
    first = _train_losses(tmp_path / "split")
    assert [s for s, _ in first] == [1, 2]
    run_training(full, run_dir=tmp_path / "split", resume=True)
    expected, got = _train_losses(tmp_path / "full"), _train_losses(tmp_path / "split")
    assert [s for s, _ in got] == [1, 2, 3, 4]
    for (s1, l1), (s2, l2) in zip(expected, got):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-6)
    ck_full = torch.load(tmp_path / "full/checkpoints/last.pt", weights_only=False)["method"]
    ck_split = torch.load(tmp_path / "split/checkpoints/last.pt", weights_only=False)["method"]
    for key in ck_full:
        assert torch.allclose(ck_full[key].float(), ck_split[key].float(), atol=1e-5), key


def test_nan_loss_is_a_clear_error_and_keeps_the_checkpoint(tmp_path):
    cfg = tiny_config("simclr", "train.lr=1e30", "method.proj_hidden_dim=32", out_dir=tmp_path)
    with pytest.raises(UserError, match="loss became"):
        run_training(cfg, run_dir=tmp_path / "run")
    assert not list((tmp_path / "run").rglob("*.tmp"))


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
    assert main(["pretrain", "data.name=folder", f"data.path={tmp_path / 'missing'}"]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_methods_lists_registered(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "simclr" in out and "byol" in out


def test_tensorboard_logger_or_clear_error(tmp_path):
    cfg = tiny_config("simclr", "train.epochs=1", "train.logger=tensorboard", "method.proj_hidden_dim=32",
                      out_dir=tmp_path)
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install 'kith-ssl\\[log\\]'"):
            run_training(cfg, run_dir=tmp_path / "run", final_eval=False)
    else:
        run_training(cfg, run_dir=tmp_path / "run", final_eval=False)
        assert list((tmp_path / "run" / "tensorboard").iterdir())


def test_python_api_pretrain_and_resume(tmp_path):
    import kith
    from tests.conftest import TINY

    overrides = dict(item.split("=", 1) for item in TINY)
    overrides.update({"method.name": "nnclr", "method.queue_size": 64, "method.proj_hidden_dim": 32,
                      "method.pred_hidden_dim": 32, "train.epochs": 2})
    result = kith.pretrain(run_dir=tmp_path / "run", **overrides)
    assert result.epochs == 2 and set(result.knn) == {5}
    assert "nnclr" in kith.METHODS
    assert kith.evaluate(tmp_path / "run", ks=[5])[5] == pytest.approx(result.knn[5])
    again = kith.pretrain(run_dir=tmp_path / "run", resume=True, **{"train.epochs": 3})
    assert again.epochs == 3
