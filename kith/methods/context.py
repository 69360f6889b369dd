"""What the loop tells a method: the run's fixed facts (`TrainInfo`), the current step (`StepInfo`)
and the epoch-start context a method may use to refresh state over the whole dataset (`EpochContext`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from kith.utils import distributed
from kith.utils.progress import show_progress


@dataclass
class TrainInfo:
    """What a method may know about the run it is part of."""

    num_samples: int
    steps_per_epoch: int
    epochs: int
    seed: int = 0

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


@dataclass
class StepInfo:
    step: int  # global optimizer step, 0-based
    steps_per_epoch: int
    # what the method's `step_inputs` made for this step, before the (compiled) forward
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    # train.cuda_graph: the step is captured once and replayed, so it may branch on no host value that
    # changes (the step number included): what changes comes in `inputs`, on the device
    graphed: bool = False

    @property
    def epoch_progress(self) -> float:
        """Fractional epoch, e.g. 2.5 halfway through the third epoch."""
        return self.step / self.steps_per_epoch


class EpochContext:
    """What `Method.on_epoch_start` may use: a clean (un-augmented) pass over the training set."""

    def __init__(self, clean_batches, labels: torch.Tensor, progress: bool = True):
        self._clean_batches = clean_batches
        self.labels = labels
        self.progress = progress

    def clean_batches(self):
        """Yields `(images (B, 3, S, S) normalised float, labels (B,), indices (B,))` over the whole split."""
        return self._clean_batches()

    @torch.no_grad()
    def embed(self, modules: list[nn.Module], dim: int, device: torch.device, bf16: bool = False,
              desc: str = "embedding") -> torch.Tensor:
        """(N, dim) L2-normalised outputs of `modules` applied in order to every clean training image,
        in dataset-index order; the modules run in eval mode (their train/eval mode is restored after)
        and, with `bf16`, under bfloat16 autocast."""
        was_training = [m.training for m in modules]
        for m in modules:
            m.eval()
        num_samples = len(self.labels)
        out = torch.zeros(num_samples, dim, device=device)
        bar = tqdm(total=num_samples, desc=desc, unit="img", leave=False,
                   disable=not (show_progress(self.progress) and distributed.is_main_process()),
                   dynamic_ncols=True)
        try:
            for images, _, indices in self.clean_batches():
                x = images.to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    for m in modules:
                        x = m(x)
                out[indices.to(device, torch.long)] = F.normalize(x.float(), dim=-1)
                bar.update(images.shape[0])
        finally:
            bar.close()
            for m, flag in zip(modules, was_training):
                m.train(flag)
        return out
