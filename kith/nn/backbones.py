"""Backbones: torchvision ResNets (optionally with the CIFAR stem), a tiny convnet, timm models.

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
BACKBONES = (*RESNET_FEATURE_DIM, "tiny", "timm:<name>")


@dataclass
class BackboneConfig:
    """The `backbone` config section."""

    name: str = "resnet18"  # resnet18 | resnet34 | resnet50 | tiny | timm:<model name>
    cifar_stem: bool = True  # 3x3 stride-1 first conv, no max-pool (32x32 images)
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
    if name == "tiny":
        net = TinyConvNet(section.width)
        return net, net.feature_dim
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise UserError("backbone timm:* needs timm: pip install 'kith-ssl[timm]'") from None
        net = timm.create_model(name[5:], pretrained=False, num_classes=0)
        return net, net.num_features
    raise UserError(f"unknown backbone.name '{name}'{did_you_mean(name, BACKBONES)}; "
                    f"one of {', '.join(BACKBONES)}")
