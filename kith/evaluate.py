"""Feature extraction and weighted kNN evaluation of a backbone.

kNN protocol (SPEC): backbone features of clean, centre-resized images; L2-normalised;
cosine similarity; votes weighted by exp(sim / T) with T = 0.07; train features are the
bank, test features the queries; top-1 accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from kith.data.augment import clean_view
from kith.data.loader import iter_images
from kith.data.sources import ImageData
from kith.memory import chunked_topk


@torch.no_grad()
def extract_features(backbone: nn.Module, data: ImageData, size: int, mean: Sequence[float],
                     std: Sequence[float], device: torch.device, batch_size: int = 512,
                     progress: bool = False, desc: str = "features") -> torch.Tensor:
    """Backbone features (N, F) of the clean (un-augmented) images of `data`, in eval mode, float32 on `device`."""
    was_training = backbone.training
    backbone.eval()
    feats = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    total = -(-len(data) // batch_size)
    for batch in tqdm(iter_images(data, batch_size, device, size), total=total, desc=desc,
                      disable=not progress, leave=False):
        x = clean_view(batch.images, size, mean, std)
        with autocast:
            feats.append(backbone(x).float())
    backbone.train(was_training)
    return torch.cat(feats)


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                k: int, num_classes: int, temperature: float = 0.07, chunk_size: int = 1024) -> torch.Tensor:
    """Class scores (M, C) of weighted kNN: Σ over the k most cosine-similar bank items of exp(sim/T)·onehot."""
    train_features = F.normalize(train_features, dim=1)
    k = min(k, len(train_features))
    scores = []
    for query in F.normalize(test_features, dim=1).split(chunk_size):
        sims, idx = chunked_topk(query, train_features, k)
        weights = (sims / temperature).exp()
        votes = torch.zeros(len(query), num_classes, device=query.device)
        votes.scatter_add_(1, train_labels[idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, ks: Sequence[int] = (20, 200), temperature: float = 0.07
                 ) -> dict[int, float]:
    """Top-1 accuracy (percent) for each k. Items with label -1 are left out of bank and queries."""
    device = train_features.device
    train_labels, test_labels = train_labels.to(device), test_labels.to(device)
    bank = train_labels >= 0
    queries = test_labels >= 0
    if not bank.any() or not queries.any():
        return {}
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    out = {}
    for k in ks:
        scores = knn_predict(train_features[bank], train_labels[bank], test_features[queries], k, num_classes,
                             temperature)
        out[int(k)] = 100.0 * (scores.argmax(1) == test_labels[queries]).float().mean().item()
    return out


def evaluate_knn(backbone: nn.Module, train: ImageData, test: ImageData, size: int, mean, std,
                 device: torch.device, ks: Sequence[int] = (20, 200), temperature: float = 0.07,
                 batch_size: int = 512, progress: bool = False) -> dict[int, float]:
    """Extract clean features of both splits and run weighted kNN for each k."""
    train_f = extract_features(backbone, train, size, mean, std, device, batch_size, progress, "train features")
    test_f = extract_features(backbone, test, size, mean, std, device, batch_size, progress, "test features")
    return knn_accuracy(train_f, train.labels, test_f, test.labels, ks, temperature)
