"""`train.online_linear`: a linear classifier trained during pretraining on detached backbone features.

This is the protocol of solo-learn's published tables (their "online linear" accuracy): every
training step, the features the backbone computed for the step's augmented views are detached and
a linear layer is trained on them with its own SGD (labelled images only: a label of -1 counts for
nothing). The features are detached before the classifier sees them, so its loss has no path to
the backbone, and it has its own optimizer, so the method's optimizer never sees its parameters:
the pretraining computes exactly what it computes without it. At each epoch end it is evaluated
on the clean (un-augmented) test images, in eval mode, and logged; its last accuracy goes in
summary.json as `online_linear_top1`.

Features are taken by a forward hook on the online backbone (calls in training mode only: the kNN
monitor and feature extraction run it in eval mode), every call of the step concatenated; the
views' labels are the batch's labels repeated once per `B` rows (views concatenated along the
batch, as every method does).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kith.data.images import ImageData
from kith.data.spec import ImageSpec
from kith.evaluation.probe import extract_features
from kith.utils import distributed as dist
from kith.utils.capacity import check_fits, classifier_need
from kith.utils.errors import UserError

LR, MOMENTUM = 0.1, 0.9  # solo-learn's classifier: SGD, lr 0.1, no weight decay, the run's lr schedule


class OnlineLinear:
    """The classifier, its optimizer and the hook that collects a step's features."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, device: torch.device):
        self.head = nn.Linear(feature_dim, num_classes).to(device)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=LR, momentum=MOMENTUM)
        self.features: list[torch.Tensor] = []
        self.handle = backbone.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if module.training and torch.is_tensor(output):
            self.features.append(output.detach())

    def begin(self) -> None:
        """Forget features of calls outside a step (an epoch start's pass over the data)."""
        self.features = []

    def step(self, labels: torch.Tensor, lr_factor: float) -> dict[str, torch.Tensor]:
        """One SGD step on the features kept since `begin`; labels: (B,) long, -1 unknown.
        Returns the metrics as device tensors (accuracy NaN when no label is known: skipped in the mean).
        """
        feats, self.features = self.features, []
        if not feats:
            return {}
        x = torch.cat([f.float().flatten(1) for f in feats])
        if x.shape[0] % labels.shape[0]:
            return {}  # not whole views of this batch: nothing to learn from
        y = labels.repeat(x.shape[0] // labels.shape[0])
        known = (y >= 0).float()
        logits = self.head(x)
        # mean over the labelled rows, without reading their count on the host (0 of them: loss 0)
        per_row = F.cross_entropy(logits, y.clamp(min=0), reduction="none")
        loss = (per_row * known).sum() / known.sum().clamp(min=1)
        for g in self.optimizer.param_groups:
            g["lr"] = LR * lr_factor
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dist.world_size() > 1:  # one classifier on every rank: average its gradients
            for p in self.head.parameters():
                p.grad = dist.all_reduce_sum(p.grad) / dist.world_size()
        self.optimizer.step()
        correct = ((logits.detach().argmax(1) == y).float() * known).sum()
        return {"online_linear_loss": loss.detach(), "online_linear_train_acc": 100 * correct / known.sum()}

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, test: ImageData, spec: ImageSpec, device: torch.device,
                 batch_size: int) -> float:
        """Top-1 (%) on the clean test images (labelled ones), backbone in eval mode."""
        feats = extract_features(backbone, test, spec, device, batch_size, desc="online linear")
        labels = test.labels.to(device)
        known = labels >= 0
        pred = self.head(feats.flatten(1)).argmax(1)
        return float(100 * ((pred == labels) & known).sum() / known.sum().clamp(min=1))

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])


def build_online_linear(backbone: nn.Module, feature_dim: int, train: ImageData,
                        device: torch.device) -> OnlineLinear:
    if not train.has_labels:
        raise UserError("train.online_linear=true needs labelled training images (this data has none); "
                        "set train.online_linear=false")
    check_fits([classifier_need(feature_dim, train.num_classes)], device)
    return OnlineLinear(backbone, feature_dim, train.num_classes, device)
