import math

import pytest
import torch
from torch import nn

from kith.methods.base import cosine_tau
from kith.nn.backbones import BackboneConfig, build_backbone
from kith.nn.heads import mlp
from kith.train.optim import LARS, lr_factor, split_decay_groups


def test_resnet18_cifar_stem_keeps_resolution():
    net, dim = build_backbone(BackboneConfig("resnet18", cifar_stem=True))
    assert dim == 512
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_resnet_imagenet_stem():
    net, dim = build_backbone(BackboneConfig("resnet18", cifar_stem=False))
    assert net.conv1.kernel_size == (7, 7)
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, dim)


def test_tiny_backbone():
    net, dim = build_backbone(BackboneConfig("tiny", width=8))
    assert net(torch.randn(3, 3, 16, 16)).shape == (3, dim) == (3, 64)


def test_mlp_structure():
    head = mlp(512, 2048, 256, layers=3, last_bn=True)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert head[0].in_features == 512 and head[3].out_features == 2048 and head[6].out_features == 256
    no_bn = mlp(512, 4096, 512, bn=False)
    assert [type(m).__name__ for m in no_bn] == ["Linear", "ReLU", "Linear"]
    assert no_bn[0].bias is not None


def test_cosine_tau_schedule():
    assert cosine_tau(0, 100, 0.99, 1.0) == 0.99
    assert math.isclose(cosine_tau(100, 100, 0.99, 1.0), 1.0)
    assert math.isclose(cosine_tau(50, 100, 0.99, 1.0), 0.995)


def test_lr_warmup_then_cosine():
    assert lr_factor(0, 100, 10) == 0.1
    assert lr_factor(9, 100, 10) == 1.0
    assert lr_factor(10, 100, 10) == 1.0
    assert math.isclose(lr_factor(55, 100, 10), 0.5)
    assert lr_factor(100, 100, 10) == 0.0


def test_lars_excludes_bias_and_norm_and_adapts_weights():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    bn = nn.BatchNorm1d(3)
    groups = split_decay_groups([{"params": list(layer.parameters()) + list(bn.parameters())}], 0.1)
    assert [g["lars_exclude"] for g in groups] == [False, True]
    assert groups[1]["weight_decay"] == 0.0 and len(groups[0]["params"]) == 1
    opt = LARS(groups, lr=1.0, momentum=0.0, eta=0.02, clip=True)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    for p in (layer.weight, layer.bias):
        p.grad = torch.ones_like(p)
    for p in bn.parameters():
        p.grad = None
    opt.step()
    # bias: plain SGD step (no adaptation, no decay)
    assert torch.allclose(layer.bias, b0 - 1.0)
    # weight: d = (g + wd w) * min(eta |w| / (|g| + wd |w|) / lr, 1)
    g = torch.ones_like(w0)
    local = 0.02 * w0.norm() / (g.norm() + 0.1 * w0.norm())
    expected = w0 - (g + 0.1 * w0) * min(local.item(), 1.0)
    assert torch.allclose(layer.weight, expected, atol=1e-6)



@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenet_v3_large", "mobilenet_v3_small"])
def test_lightweight_torchvision_backbones_and_their_cifar_stem(name):
    """Pooled features of the reported width; the CIFAR stem (stride-1 first conv) halves the total stride,
    so a 32x32 image keeps a 2x2 map before pooling instead of 1x1."""
    from kith.nn.backbones import LIGHT_FEATURE_DIM

    x = torch.randn(2, 3, 32, 32)
    for stem, side in ((True, 2), (False, 1)):
        net, dim = build_backbone(BackboneConfig(name=name, cifar_stem=stem))
        assert dim == LIGHT_FEATURE_DIM[name] and net.eval()(x).shape == (2, dim)
        assert net.features(x).shape[-1] == side


def test_vit_s16_through_timm_takes_any_crop_size():
    pytest.importorskip("timm")


    net, dim = build_backbone(BackboneConfig(name="vit_s16", cifar_stem=True))
    assert dim == 384 and net.patch_embed.patch_size == (4, 4)
    for side in (32, 16, 8):  # multi-crop's smaller crops: position embeddings follow the input
        assert net.eval()(torch.randn(2, 3, side, side)).shape == (2, 384)
