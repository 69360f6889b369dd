"""`train.cuda_graph`: the step from forward to EMA update captured once and replayed. A replay reruns
the captured kernels on the same memory with the captured scalars, so every value that changes from step
to step must be on the device and every piece of state must be updated in place. `ReplayCheck` (the CPU
stand-in for a CUDA graph) reruns the step at each "replay" and fails when it dispatches any op, scalar
or persistent tensor other than at capture; with it, whole runs of every method, across ReSSL's warm-up
end and SPCL's first clustering, must log the eager run's losses."""

from __future__ import annotations

import pytest
import torch

from kith.methods import METHODS
from kith.train import step as train_step
from kith.train.graphed import GraphedStep, GraphReplayError, ReplayCheck
from kith.train.loop import run_training
from kith.train.optim import LARS
from kith.utils.errors import UserError
from tests.helpers import (
    PHASES,
    assert_same_run,
    image_folder,
    logged_rows,
    small_heads,
    stream_config,
    tiny_config,
)

BACKENDS: list[ReplayCheck] = []


@pytest.fixture
def replay_check(monkeypatch):
    BACKENDS.clear()

    def backend(device):
        BACKENDS.append(ReplayCheck())
        return BACKENDS[-1]

    monkeypatch.setattr(train_step, "graph_backend", backend)
    return BACKENDS


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in logged_rows(run_dir) if r["kind"] == "train"]


@pytest.mark.parametrize("name, keys", [(name, []) for name in sorted(METHODS)]
                         + [(name, ["data.augment_rng=device"]) for name in sorted(METHODS)]
                         + [("byol", ["train.optimizer=sgd", "train.grad_clip=1.0"])])
def test_a_graphed_run_logs_the_eager_runs_losses(name, keys, tmp_path, replay_check):
    # data.augment_rng=device: the graph augments the batch itself, from the device's generator
    # reseeded each step (on a CPU that is a CPU generator with the same seed: the eager run's views)
    # epochs of 2 steps: eager warm-up, capture, replays; SPCL clusters at its third step (a second
    # graph key: one epoch more for its replays); ReSSL's warm-up ends after the capture, inside a replay
    epochs = 4 if name == "spcl" else 3
    phases = ["method.warmup_epochs=2"] if name == "ressl" else PHASES.get(name, [])
    common = [*small_heads(name), *phases, f"train.epochs={epochs}", "train.knn_every=0",
              "train.log_every=1", *keys]
    run_training(tiny_config(name, *common, out_dir=tmp_path), run_dir=tmp_path / "eager", final_eval=False)
    run_training(tiny_config(name, *common, "train.cuda_graph=true", out_dir=tmp_path),
                 run_dir=tmp_path / "graphed", final_eval=False)
    want, got = _losses(tmp_path / "eager"), _losses(tmp_path / "graphed")
    assert len(want) == len(got) == 2 * epochs
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert replay_check[0].replays > 0  # the later steps were replays of a captured graph
    augmented = ["aten.grid_sampler_2d.default" in ops for ops in replay_check[0].recorded]
    assert augmented == ["data.augment_rng=device" in keys] * len(augmented)


@pytest.mark.parametrize("extra", [[], ["augment.small={size: 8, min_scale: 0.05, max_scale: 0.3}",
                                        "method.extra_views=[small,small]"]])
def test_a_graphed_streamed_run_augments_its_cut_crops_inside_the_graph(extra, tmp_path, replay_check):
    # streamed batches: the workers cut each view's (and each extra crop's) uint8 crops, the graph makes
    # the photometric part from them
    root = image_folder(tmp_path / "data", n=40)
    common = ["data.num_workers=0", "train.epochs=3", "train.knn_every=0", "train.log_every=1", *extra]
    run_training(stream_config(root, *common, f"out_dir={tmp_path}"), run_dir=tmp_path / "eager",
                 final_eval=False)
    run_training(stream_config(root, *common, "train.cuda_graph=true", "data.augment_rng=device",
                               f"out_dir={tmp_path}"), run_dir=tmp_path / "graphed", final_eval=False)
    want, got = _losses(tmp_path / "eager"), _losses(tmp_path / "graphed")
    assert len(want) == len(got) > 6  # past 3 eager steps and the capture
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert replay_check[0].replays > 0
    assert all("aten.grid_sampler_2d.default" not in ops and "aten.add.Tensor" in ops
               for ops in replay_check[0].recorded)  # no crop inside: the workers cut them


def test_the_replay_check_fails_a_step_that_reads_a_changing_host_scalar():
    weight = torch.zeros(3)
    lr = [0.1]
    graphed = GraphedStep(ReplayCheck(), lambda: [weight], warmup_steps=1)

    def body(views, tensors):  # a Python float read at capture: a replay would keep 0.1
        weight.add_(views[0], alpha=lr[0])
        return weight.sum(), {}

    for step in range(3):
        graphed((), {}, body, [torch.ones(3)])  # the same float: replays are faithful
    lr[0] = 0.2
    with pytest.raises(GraphReplayError, match="differs from its capture"):
        graphed((), {}, body, [torch.ones(3)])


def test_the_replay_check_fails_a_step_that_replaces_its_state():
    holder = {"queue": torch.zeros(4)}
    graphed = GraphedStep(ReplayCheck(), lambda: [holder["queue"]], warmup_steps=1)

    def body(views, tensors):  # rebinding: a replay would write into the captured storage
        out = holder["queue"] + views[0]
        holder["queue"] = torch.roll(out, 1)
        return out.sum(), {}

    graphed((), {}, body, [torch.ones(4)])
    graphed((), {}, body, [torch.ones(4)])  # capture
    with pytest.raises(GraphReplayError, match="differs from its capture"):
        graphed((), {}, body, [torch.ones(4)])


def test_the_replay_check_fails_a_host_metric_that_changes():
    count = [0]
    graphed = GraphedStep(ReplayCheck(), lambda: [], warmup_steps=0)

    def body(views, tensors):
        count[0] += 1
        return views[0].sum(), {"step": count[0]}

    graphed((), {}, body, [torch.ones(2)])
    with pytest.raises(GraphReplayError, match="host value that changed"):
        graphed((), {}, body, [torch.ones(2)])


def test_the_replay_check_fails_a_step_that_makes_a_tensor_from_host_values():
    graphed = GraphedStep(ReplayCheck(), lambda: [], warmup_steps=0)

    def body(views, tensors):
        return (views[0] * torch.tensor([1.0, 2.0])).sum(), {}

    with pytest.raises(GraphReplayError, match="tensor from host values"):
        graphed((), {}, body, [torch.ones(2)])


@pytest.mark.parametrize("registered", [False, True])
def test_a_graphed_draw_needs_its_generator_registered_and_reseeded(registered):
    gen = torch.Generator()
    graphed = GraphedStep(ReplayCheck(), lambda: [], warmup_steps=1, generators=[gen] if registered else [])
    outputs = []
    for step in range(3):
        gen.manual_seed(step)

        def body(views, tensors):
            return views[0] + torch.rand(2, generator=gen), {}

        if not registered and step == 1:  # the capture
            with pytest.raises(GraphReplayError, match="not registered"):
                graphed((), {}, body, [torch.zeros(2)])
            return
        outputs.append(graphed((), {}, body, [torch.zeros(2)])[0].clone())
    want = [torch.rand(2, generator=torch.Generator().manual_seed(step)) for step in range(3)]
    torch.testing.assert_close(torch.stack(outputs), torch.stack(want), rtol=0, atol=0)


@pytest.mark.parametrize("keys, message", [
    ([], "needs a CUDA device"),
    (["train.optimizer=adamw"], "not adamw"),
    (["train.precision=fp16"], "fp16"),
    (["train.online_linear=true"], "online_linear"),
    (["train.compile=true", "train.compile_mode=reduce-overhead"], "makes CUDA graphs itself"),
])
def test_settings_a_graph_cannot_capture_are_refused_in_one_line(keys, message, tmp_path, monkeypatch):
    if keys:  # past the device check, to the setting's own refusal
        monkeypatch.setattr(train_step, "graph_backend", lambda device: ReplayCheck())
        monkeypatch.setattr(train_step, "resolve_precision",
                            lambda p, d: torch.float16 if p == "fp16" else None)
    cfg = tiny_config("byol", *small_heads("byol"), "train.cuda_graph=true", *keys, out_dir=tmp_path)
    with pytest.raises(UserError, match=message) as err:
        run_training(cfg, run_dir=tmp_path / "run", final_eval=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("lr_on_device", [False, True])
def test_lars_without_adaptation_is_torch_sgd(lr_on_device):
    torch.manual_seed(0)
    ours = [torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    lr = torch.tensor(0.1) if lr_on_device else 0.1
    opt = LARS([{"params": ours, "weight_decay": 1e-3}], lr=lr, momentum=0.9, adapt=False)
    ref = torch.optim.SGD([{"params": theirs, "weight_decay": 1e-3}], lr=0.1, momentum=0.9)
    for _ in range(4):
        grads = [torch.randn_like(p) for p in ours]
        for params, o in ((ours, opt), (theirs, ref)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            o.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name, extra", [("byol", []), ("nnclr", []), ("spcl", []),
                                         ("msf", ["data.augment_rng=device"])])
def test_a_graphed_run_resumed_mid_epoch_is_the_uninterrupted_graphed_run(name, extra, tmp_path,
                                                                          replay_check):
    # the lr and EMA-weight tensors, the optimizer state and the queues come back from the checkpoint;
    # after the resume each graph is warmed up and captured again (with the augmentation inside, its
    # generator reseeded for the resumed step)
    keys = [*small_heads(name), *PHASES.get(name, []), "train.epochs=4", "train.knn_every=0",
            "train.log_every=1", "train.cuda_graph=true", *extra]
    full = tiny_config(name, *keys, out_dir=tmp_path / "a")
    run_training(full, run_dir=tmp_path / "full", final_eval=False)
    cfg = tiny_config(name, *keys, out_dir=tmp_path / "b")
    run_training(cfg, run_dir=tmp_path / "run", final_eval=False, stop_after_step=5)
    run_training(cfg, run_dir=tmp_path / "run", resume=True, final_eval=False)
    assert_same_run(tmp_path / "run", tmp_path / "full")
