"""Backbones: torchvision ResNets (optionally with the CIFAR stem), torchvision's lightweight networks
(EfficientNet-B0, MobileNet-V3 large and small, the networks ReSSL reports on), a ViT-S/16 through timm,
a tiny convnet, any timm model.

Every builder returns `(module, feature_dim)`; the module maps (B, 3, H, W) to (B, feature_dim).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kith.utils.errors import UserError, did_you_mean
from kith.utils.keys import count

RESNET_FEATURE_DIM = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}  # torchvision's, before `fc`
# torchvision's, the pooled features before `classifier` (no extra dependency)
LIGHT_FEATURE_DIM = {"efficientnet_b0": 1280, "mobilenet_v3_large": 960, "mobilenet_v3_small": 576}
VIT_S16 = "vit_s16"  # timm's vit_small_patch16_224 (needs the timm extra)
BACKBONES = (*RESNET_FEATURE_DIM, *LIGHT_FEATURE_DIM, VIT_S16, "tiny", "timm:<name>")


@dataclass
class BackboneConfig:
    """The `backbone` config section."""

    # resnet18 | resnet34 | resnet50 | efficientnet_b0 | mobilenet_v3_large | mobilenet_v3_small | vit_s16
    # | tiny | timm:<model name>
    name: str = "resnet18"
    cifar_stem: bool = True  # small images: ResNets 3x3 stride-1 conv, no max-pool; see each builder
    width: int = count(32)  # tiny convnet only


def _resnet(name: str, cifar_stem: bool) -> tuple[nn.Module, int]:
    import torchvision

    model = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        # 32x32 inputs: keep spatial resolution (3x3 stride-1 conv, no max-pool), as solo-learn does
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model, feature_dim


def _light(name: str, cifar_stem: bool) -> tuple[nn.Module, int]:
    """torchvision's EfficientNet-B0 / MobileNet-V3 with its classifier removed: the pooled features.
    CIFAR stem: the first conv at stride 1 instead of 2 (as the ResNets' CIFAR stem keeps resolution), so
    a 32x32 image leaves a 2x2 map before the pooling instead of 1x1."""
    import torchvision

    model = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        stem = model.features[0][0]
        model.features[0][0] = nn.Conv2d(stem.in_channels, stem.out_channels, stem.kernel_size, stride=1,
                                         padding=stem.padding, bias=False)
    model.classifier = nn.Identity()
    return model, LIGHT_FEATURE_DIM[name]


def _timm(name: str, **kwargs: Any) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise UserError(f"backbone {name} needs timm: pip install timm (the timm extra)") from None
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def _vit_s16(cifar_stem: bool) -> tuple[nn.Module, int]:
    """ViT-S/16 (timm's vit_small_patch16_224, the class token's features). Position embeddings follow the
    input size (`dynamic_img_size`), so multi-crop's smaller crops work. CIFAR stem: 4x4 patches and a 32x32
    position grid, 64 tokens for a 32x32 image (16x16 patches would leave 4)."""
    stem = {"patch_size": 4, "img_size": 32} if cifar_stem else {}
    net = _timm("vit_small_patch16_224", dynamic_img_size=True, **stem)
    return net, net.num_features


class TinyConvNet(nn.Module):
    """Four conv-BN-ReLU stages with stride-2 downsampling and global average pooling.

    For tests and the CPU demo: a few hundred thousand parameters at width 32.
    """

    def __init__(self, width: int = 32):
        super().__init__()
        chans = [3, width, width * 2, width * 4, width * 8]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


def build_backbone(section: BackboneConfig | Any) -> tuple[nn.Module, int]:
    """The network a `backbone` config section (a BackboneConfig or its DictConfig) names, one of
    `BACKBONES`, with its feature dimension."""
    name = section.name
    if name in RESNET_FEATURE_DIM:
        return _resnet(name, section.cifar_stem)
    if name in LIGHT_FEATURE_DIM:
        return _light(name, section.cifar_stem)
    if name == VIT_S16:
        return _vit_s16(section.cifar_stem)
    if name == "tiny":
        net = TinyConvNet(section.width)
        return net, net.feature_dim
    if name.startswith("timm:"):
        net = _timm(name[5:])
        return net, net.num_features
    raise UserError(f"unknown backbone.name '{name}'{did_you_mean(name, BACKBONES)}; "
                    f"one of {', '.join(BACKBONES)}")
