"""The kNN monitor under torch.distributed: every rank embeds its own share of both splits (none waits
in a collective while rank 0 embeds everything, which on a large dataset outlasts NCCL's 10-minute
timeout) and every rank gets the accuracies of the single-process kNN. Two gloo processes on the CPU."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp
from torch import nn

from kith.data.images import ImageData
from kith.data.spec import ImageSpec
from kith.evaluation.probe import KnnSettings, backbone_knn, rank_shard
from tests.helpers import gloo_group

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
SPEC = ImageSpec(size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
SETTINGS = KnnSettings(ks=(1, 5), batch_size=8)


def _splits() -> tuple[ImageData, ImageData]:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(10)
    # each class a brightness level: a kNN on random-conv features separates them
    noise = torch.randint(0, 20, (40, 3, 8, 8), generator=gen)
    images = (labels[:, None, None, None] * 60 + noise).to(torch.uint8)
    classes = list("abcd")
    train = ImageData(labels=labels[:27], classes=classes, images=images[:27], size=8)  # 27: uneven shares
    test = ImageData(labels=labels[27:], classes=classes, images=images[27:], size=8)
    return train, test


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return self.net(x)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with gloo_group(rank, 2):
        backbone = _Counting()
        train, test = _splits()
        knn = backbone_knn(backbone, train, test, SPEC, torch.device("cpu"), SETTINGS)
        torch.save({"knn": knn, "seen": backbone.seen}, os.path.join(out, f"rank{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_rank_embeds_its_share_and_gets_the_single_process_accuracies(tmp_path):
    train, test = _splits()
    single = backbone_knn(_Counting(), train, test, SPEC, torch.device("cpu"), SETTINGS)
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for result in results:
        assert result["knn"] == pytest.approx(single)
    # 27 + 13 images: rank 0 embeds 14 + 7, rank 1 the other 13 + 6, together each image once
    assert [r["seen"] for r in results] == [21, 19]


def test_the_shares_cover_the_split_in_order_also_with_more_ranks_than_images():
    train, _ = _splits()
    for world in (1, 2, 4, 30):
        shares = [rank_shard(train, r, world) for r in range(world)]
        assert torch.equal(torch.cat([s.images for s in shares]), train.images)
        assert torch.equal(torch.cat([s.labels for s in shares]), train.labels)
