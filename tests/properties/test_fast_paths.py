"""The fast paths compute what the plain paths compute: foreach LARS vs its loop, the foreach EMA vs
its formula, channels_last vs the default layout, torch.compile vs eager; the training loop reads
nothing back from the device between log steps; `kith bench` runs in a tiny mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kith.methods import METHODS
from kith.train.optim import LARS, split_decay_groups


def _lars_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
                         nn.BatchNorm1d(5), nn.Linear(5, 3))


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_foreach_lars_equals_the_loop(clip, weight_decay):
    models = [_lars_model(), _lars_model()]
    frozen = models[0][4].weight  # a parameter without a gradient is skipped by both
    opts = []
    for model, foreach in zip(models, (True, False)):
        model[4].weight.requires_grad_(False)
        groups = split_decay_groups([{"params": list(model.parameters())}], weight_decay)
        assert [g["lars_exclude"] for g in groups] == [False, True]  # weights and biases/norms
        opts.append(LARS(groups, lr=0.5, momentum=0.9, eta=0.02, clip=clip, foreach=foreach))
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        x = torch.randn(8, 3, 8, 8, generator=gen)
        for model, opt in zip(models, opts):
            for g in opt.param_groups:
                g["lr"] = 0.5 * (step + 1) / 5  # a changing lr, as the schedule sets it
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert frozen.grad is None


def test_foreach_ema_follows_the_formula():
    from kith.methods.base import Method, MomentumConfig
    from kith.methods.context import TrainInfo

    class Tiny(Method):
        Config = MomentumConfig

    config = MomentumConfig(name="tiny", tau_base=0.9, tau_final=1.0)
    method = Tiny(config, nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), 4, TrainInfo(10, 5, 2))
    method.add_momentum_copy("backbone", "momentum_backbone")
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(torch.randn_like(p))
    online = [p.detach().clone() for p in method.backbone.parameters()]
    target = [p.detach().clone() for p in method.momentum_backbone.parameters()]
    tau = method.update_momentum(3)
    assert tau == pytest.approx(method.momentum_tau(3))
    for o, t, new in zip(online, target, method.momentum_backbone.parameters()):
        torch.testing.assert_close(new, tau * t + (1 - tau) * o, rtol=0, atol=1e-6)


def _trainer(method: str, *overrides: str):
    from kith.methods.context import TrainInfo
    from kith.train.setup import build_method
    from kith.train.step import TrainStep
    from tests.helpers import tiny_config

    cfg = tiny_config(method, "method.proj_hidden_dim=32", "method.proj_output_dim=16", *overrides)
    torch.manual_seed(0)
    info = TrainInfo(num_samples=64, steps_per_epoch=2, epochs=2, seed=0)
    return TrainStep(cfg, build_method(cfg, info), torch.device("cpu"), steps_per_epoch=2)


def _batch(step: int):
    from kith.data.loader import Batch

    gen = torch.Generator().manual_seed(step)
    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8, generator=gen)
    return Batch(images, torch.randint(0, 10, (32,), generator=gen), torch.arange(32) + 32 * (step % 2))


def _run_steps(trainer, steps: int, after_step=None) -> list[torch.Tensor]:
    losses = []
    for step in range(steps):
        loss, _, _ = trainer(_batch(step), step)
        losses.append(loss)
        if after_step:
            after_step(step)
    return losses


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_channels_last_matches_the_default_layout(method):
    plain, fast = _trainer(method, "train.channels_last=false"), _trainer(method, "train.channels_last=true")
    assert not plain.channels_last and fast.channels_last
    conv = next(m for m in fast.method.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(_run_steps(fast, 3), _run_steps(plain, 3), rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(fast.method.named_parameters(), plain.method.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("method", ["byol", "ressl"])
def test_views_written_as_bf16_channels_last_give_the_float32_views_losses(method):
    # under bf16 autocast on a conv net the views are written as the first convolution reads them
    keys = ("train.channels_last=true", "train.precision=bf16")
    direct, plain = _trainer(method, *keys), _trainer(method, *keys)
    for augment in plain.augments.values():
        augment.write_views_as(torch.float32, torch.contiguous_format)
    views = direct.views(_batch(0), 0)
    nhwc = torch.channels_last
    assert all(v.dtype == torch.bfloat16 and v.is_contiguous(memory_format=nhwc) for v in views)
    assert all(v.dtype == torch.float32 for v in plain.views(_batch(0), 0))
    torch.testing.assert_close(_run_steps(direct, 3), _run_steps(plain, 3), rtol=0, atol=0)


def _clustered(trainer):
    """SPCL past its first clustering (the prototype terms and partner draws in the step)."""
    if trainer.method.name == "spcl":
        gen = torch.Generator().manual_seed(5)
        trainer.method.prototypes.recluster(torch.randn(64, 16, generator=gen), iters=2, seed=0)
    return trainer


# every method, with its queue pushes (deferred to after_step, or MSF's inside the step), SPCL's
# prototype terms and ReSSL's InfoNCE warm-up and its end: one graph, no graph break, nothing run eagerly
@pytest.mark.parametrize("method", sorted(METHODS))
def test_compiled_step_matches_eager_without_breaks_or_recompiles(method):
    """torch.compile through dynamo + AOTAutograd with the aot_eager backend: the same graph capture,
    graph breaks and recompile guards as inductor, without its C++ code generation (a minute or more
    per graph on a busy 2-core machine); `kith bench ... train.compile=true` exercises inductor."""
    from tests.helpers import small_heads

    torch._dynamo.reset()
    # All4One's transformer dropout: a compiled graph draws its masks in another order than eager
    heads = [*small_heads(method), *(["method.transformer_dropout=0"] if method == "all4one" else [])]
    heads += ["method.warmup_epochs=1"] if method == "ressl" else []  # steps 0-1 InfoNCE, 2-4 relation
    eager = _clustered(_trainer(method, *heads))
    compiled = _clustered(_trainer(method, *heads, "train.compile=true", "train.compile_backend=aot_eager"))
    reports = []
    got = _run_steps(compiled, 5, after_step=lambda s: reports.append(compiled.compile_report()))
    torch.testing.assert_close(got, _run_steps(eager, 5), rtol=1e-5, atol=1e-5)
    assert compiled.compile_s is not None and compiled.compile_s > 0
    first, last = reports[0], reports[-1]
    assert first["compiled_graphs"] >= 1 and last["graph_breaks"] == 0 and last["fallbacks"] == 0, reports
    # no step after the first compiles anything (ReSSL's included, across its warm-up's end: the weights
    # come in as a tensor, not as a step number the graph would be specialised on)
    assert last["recompiles"] == 0, reports
    assert last["compiled_graphs"] <= 2, reports
    torch._dynamo.reset()


def test_a_fallback_to_eager_is_counted_and_warned_in_one_line(capsys):
    """Dynamo's recompile limit hit (here: a step that changes a Python int it reads, as a queue's host
    pointer did): the frame runs eagerly from then on, and the train step says so once."""
    from kith.train.step import compile_stats

    torch._dynamo.reset()
    trainer = _trainer("simclr", "train.compile=true", "train.compile_backend=aot_eager")
    calls = {"n": 0}
    training_step = trainer.method.training_step

    def changing_step(views, batch, step):
        calls["n"] += 1  # a closure cell dynamo guards on: every call recompiles
        loss, metrics = training_step(views, batch, step)
        return loss * (1 + calls["n"] * 0), metrics

    trainer.method.training_step = changing_step
    with torch._dynamo.config.patch(recompile_limit=2):
        _run_steps(trainer, 4)
    report = trainer.compile_report()
    assert report["fallbacks"] >= 1 and compile_stats(trainer.compile_base)["fallbacks"] >= 1
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kith: warning")]
    assert len(warnings) == 1 and "torch.compile gave up" in warnings[0]
    torch._dynamo.reset()


MULTICROP = ["augment.small={size: 8, min_scale: 0.05, max_scale: 0.3}", "method.extra_views=[small,small]",
             "method.queue_size=64", "method.pred_hidden_dim=32"]


def test_a_multicrop_step_keeps_channels_last_and_compiles_once():
    """ReSSL with two 8x8 extra crops (one extra tensor): channels_last equals the default layout, and the
    compiled step equals eager without recompiling (a fixed set of shapes)."""
    from kith.train.step import compile_stats

    plain, fast = _trainer("ressl", *MULTICROP), _trainer("ressl", *MULTICROP, "train.channels_last=true")
    torch.testing.assert_close(_run_steps(fast, 3), _run_steps(plain, 3), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    compiled = _trainer("ressl", *MULTICROP, "train.compile=true", "train.compile_backend=aot_eager")
    graphs = []
    got = _run_steps(compiled, 4, after_step=lambda s: graphs.append(compile_stats()["compiled_graphs"]))
    torch.testing.assert_close(got, _run_steps(_trainer("ressl", *MULTICROP), 4), rtol=1e-5, atol=1e-5)
    assert graphs[0] >= 1 and graphs[-1] == graphs[1], f"recompiled during the steps: {graphs}"
    torch._dynamo.reset()


class _HostReads:
    """Counts, while `active`, the aten ops that make the host wait for the device on CUDA: a tensor
    read as a Python number (item, float(), bool(), `if t:`), and ops whose output shape depends on
    the data (nonzero, boolean-mask indexing, masked_select, unique). On CPU nothing waits, but the
    same calls on CUDA would, so the CPU run finds them."""

    OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique", "unique_dim", "_unique2",
           "unique_consecutive", "is_nonzero", "equal")

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if counter.active and func._overloadpacket.__name__ in counter.OPS:
                    import traceback

                    counter.found.append(f"{func}: {traceback.format_stack(limit=8)[-6:-1]}")
                return func(*args, **(kwargs or {}))

        self.mode, self.active, self.found = Mode(), False, []


@pytest.mark.parametrize("method", ["simclr", "byol", "mocov2plus", "nnclr"])
def test_the_loop_reads_nothing_from_the_device_between_log_steps(tmp_path, monkeypatch, method):
    """Every step body of the loop (augmentation aside: its CPU branch counts on purpose, its GPU branch
    uses torch.where) runs without a host read; metrics are read once per log row."""
    from kith.data.loader import ResidentLoader
    from kith.train import loop as train
    from tests.helpers import tiny_config

    reads = _HostReads()
    epoch = ResidentLoader.epoch

    def watched_epoch(self, *args, **kwargs):
        for batch in epoch(self, *args, **kwargs):
            reads.active = True  # the loop body runs while the generator waits here
            yield batch
            reads.active = False

    def unwatched(fn):
        def call(*args, **kwargs):
            was, reads.active = reads.active, False
            try:
                return fn(*args, **kwargs)
            finally:
                reads.active = was
        return call

    mean_metrics, log_reads = train._mean_metrics, []
    monkeypatch.setattr(ResidentLoader, "epoch", watched_epoch)
    monkeypatch.setattr(train.TrainStep, "views", unwatched(train.TrainStep.views))
    monkeypatch.setattr(train, "_mean_metrics", unwatched(lambda rows: log_reads.append(len(rows))
                                                          or mean_metrics(rows)))
    cfg = tiny_config(method, "method.proj_hidden_dim=32", "method.proj_output_dim=16", "train.batch_size=8",
                      "train.log_every=1000", "train.knn_every=0", out_dir=tmp_path)
    with reads.mode:
        train.run_training(cfg, run_dir=tmp_path / "run", final_eval=False)
    assert reads.found == []
    assert log_reads == [8, 8]  # one read per log row (here: each epoch's end) for the 8 steps before it


BENCH_KEYS = {"preset", "method", "backbone", "data", "image_size", "batch_size", "device", "device_name",
              "torch", "threads", "precision", "channels_last", "compile", "warmup", "steps", "rounds",
              "data_aug_images_per_s", "synthetic_step_images_per_s", "full_step_images_per_s",
              "pipeline_efficiency", "flops_per_image", "achieved_tflops", "synthetic_tflops", "compile_s",
              "compile_augment", "cuda_graph", "augment_rng", "augment_in_graph"}
TINY_BENCH = ["data.train_subset=96", "train.batch_size=32", "backbone.width=8", "method.proj_hidden_dim=32"]


def test_kith_bench_demo_writes_its_json(tmp_path, capsys):
    import json

    from kith.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "demo", *TINY_BENCH, "--steps", "2", "--warmup", "1", "--rounds", "2",
                 "--out", str(out)]) == 0
    assert "efficiency" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert BENCH_KEYS <= set(report)
    assert report["preset"] == "demo" and report["device"] == "cpu" and report["batch_size"] == 32
    for key in ("data_aug_images_per_s", "synthetic_step_images_per_s", "full_step_images_per_s",
                "pipeline_efficiency", "flops_per_image", "achieved_tflops"):
        assert report[key] > 0, key
    assert all(len(r) == 2 for r in report["per_round_images_per_s"].values())
    assert main(["bench", "demo", "--steps", "0"]) == 2  # a user error, one line


def test_bench_of_a_compiled_momentum_method_reports_compile_time_and_no_recompiles():
    from kith.config import build_config
    from kith.tools.bench import bench

    torch._dynamo.reset()
    cfg = build_config(["preset=demo", "method.name=byol", *TINY_BENCH, "method.pred_hidden_dim=32",
                        "train.compile=true", "train.compile_backend=aot_eager", "train.progress=false"])
    report = bench(cfg, warmup=2, steps=2)
    assert report["compile"] and report["compile_s"] > 0 and report["compiled_graphs"] >= 1
    assert report["recompiles_after_warmup"] == 0 and report["graph_breaks"] == 0
    torch._dynamo.reset()


def test_channels_last_auto_means_conv_nets_on_cuda():
    from kith.train.step import use_channels_last

    conv, mlp = nn.Sequential(nn.Conv2d(3, 4, 3)), nn.Sequential(nn.Linear(3, 4))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # no GPU needed: only the decision
    assert use_channels_last("auto", cuda, conv) and not use_channels_last("auto", cuda, mlp)
    assert not use_channels_last("auto", cpu, conv)
    assert use_channels_last("true", cpu, mlp) and not use_channels_last("false", cuda, conv)


def test_cudnn_benchmark_is_switched_on_cuda_only(monkeypatch):
    from kith.train.step import use_cudnn_benchmark

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert not use_cudnn_benchmark(True, torch.device("cpu")) and torch.backends.cudnn.benchmark is False
    assert use_cudnn_benchmark(True, torch.device("cuda")) and torch.backends.cudnn.benchmark is True
    assert not use_cudnn_benchmark(False, torch.device("cuda")) and torch.backends.cudnn.benchmark is False


def test_bf16_step_keeps_the_loss_in_float32():
    trainer = _trainer("byol", "train.precision=bf16")  # CPU autocast, as bf16 runs on CUDA
    loss, metrics = trainer.forward(trainer.views(_batch(0), 0), _batch(0), 0)
    assert trainer.amp_dtype == torch.bfloat16 and loss.dtype == torch.float32


def test_the_training_log_reports_the_compile_counters_over_the_whole_run(tmp_path):
    from kith.runs.metrics import read_metrics
    from kith.train.loop import run_training
    from tests.helpers import small_heads, tiny_config

    torch._dynamo.reset()
    cfg = tiny_config("msf", *small_heads("msf"), "train.epochs=2", "train.knn_every=0", "train.compile=true",
                      "train.compile_backend=aot_eager", out_dir=tmp_path)
    run_training(cfg, run_dir=tmp_path / "run", final_eval=False)
    rows = read_metrics(tmp_path / "run")
    first = [r for r in rows if r["kind"] == "compile"]
    total = [r for r in rows if r["kind"] == "compile_total"]
    assert len(first) == 1 and first[0]["step"] == 1 and first[0]["compile_s"] > 0
    assert len(total) == 1 and total[0]["step"] == 4  # 64 images / batch 32 = 2 steps per epoch
    assert {k: total[0][k] for k in ("compiled_graphs", "graph_breaks", "recompiles", "fallbacks")} == \
        {"compiled_graphs": 1, "graph_breaks": 0, "recompiles": 0, "fallbacks": 0}
    torch._dynamo.reset()
