"""The fast paths compute what the plain paths compute: foreach LARS vs its loop, the foreach EMA vs
its formula, channels_last vs the default layout, torch.compile vs eager; the training loop reads
nothing back from the device between log steps; `kith bench` runs in a tiny mode."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kith.optim import LARS, split_decay_groups


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
    from kith.methods.base import Method, MomentumConfig, TrainInfo

    class Tiny(Method):
        Config = MomentumConfig

    cfg = MomentumConfig(name="tiny", tau_base=0.9, tau_final=1.0)
    method = Tiny(cfg, nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), 4, TrainInfo(10, 5, 2))
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
