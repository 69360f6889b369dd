"""BYOL and NNCLR in a plain PyTorch loop of your own, built from kith's pieces.

    python examples/own_loop.py --method byol --steps 200      # or --method nnclr
"""
import argparse

import torch
from sklearn.datasets import load_digits

from kith import losses
from kith.data.augment import BatchAugment, ViewConfig
from kith.data.spec import ImageSpec
from kith.memory import Queue
from kith.nn.backbones import BackboneConfig, build_backbone
from kith.nn.ema import cosine_tau, ema_update, momentum_copy
from kith.nn.heads import mlp

parser = argparse.ArgumentParser()
parser.add_argument("--method", choices=["byol", "nnclr"], default="byol")
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--batch", type=int, default=128)
args = parser.parse_args()
torch.manual_seed(0)

digits = torch.tensor(load_digits().images * 16, dtype=torch.uint8)  # (1797, 8, 8), values 0..255
images = torch.nn.functional.interpolate(digits[:, None].float(), size=32).repeat(1, 3, 1, 1).byte()
spec = ImageSpec.of(32, mean=[0.5] * 3, std=[0.25] * 3)
views = [BatchAugment(ViewConfig(), spec), BatchAugment(ViewConfig(solarize_prob=0.2), spec)]
backbone, dim = build_backbone(BackboneConfig(name="tiny", width=16))
online = torch.nn.ModuleDict({"f": backbone, "g": mlp(dim, 512, 128), "h": mlp(128, 512, 128)})
encoder = torch.nn.Sequential(online["f"], online["g"])               # backbone + projector
target = momentum_copy(encoder)                                         # BYOL's EMA target
queue = Queue(4096, 128)                                                # NNCLR's support set
opt = torch.optim.AdamW(online.parameters(), lr=1e-3, weight_decay=1e-4)
gen = torch.Generator().manual_seed(0)

for step in range(args.steps):
    batch = images[torch.randint(len(images), (args.batch,), generator=gen)]
    x1, x2 = (augment(batch, gen) for augment in views)
    z1, z2 = encoder(x1), encoder(x2)
    p1, p2 = online["h"](z1), online["h"](z2)
    if args.method == "byol":
        with torch.no_grad():
            t1, t2 = target(x1), target(x2)
        loss = losses.byol_loss(p1, t2) + losses.byol_loss(p2, t1)
    else:
        n1, n2 = (queue.data[queue.neighbours(z.detach(), k=1)[1][:, 0]] for z in (z1, z2))
        loss = 0.5 * losses.nnclr_loss(n1, p2) + 0.5 * losses.nnclr_loss(n2, p1)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if args.method == "byol":
        ema_update(target, encoder, cosine_tau(step, args.steps, 0.99, 1.0))
    else:
        queue.push(z1.detach())  # after the step: the loss read the queue as it was
    if step % 50 == 0 or step == args.steps - 1:
        print(f"{args.method} step {step}: loss {loss.item():.4f}")
