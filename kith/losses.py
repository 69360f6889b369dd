"""Loss functions of every kith method: pure functions on tensors, no module state.

Conventions:

- Embeddings are passed un-normalised unless stated; each loss L2-normalises exactly what its
  formula normalises. Shapes: ``z: (B, D)``; queues and banks ``(K, D)``, already normalised.
- Every loss reduces to a scalar mean over the (local) batch, computed in float32: each is wrapped
  in `kith.utils.device.float32_loss` (autocast off, floating inputs cast up), so callers need not cast.
- Under DDP the losses marked (g) all-gather the other side *with gradient*
  (`kith.utils.distributed.gather_with_grad`); this rank's samples sit at
  ``rank_offset(B) + arange(B)`` in the gathered batch. Each rank's loss is the mean over its own
  anchors, so after DDP averages the parameter gradients over ranks they equal the single-process
  gradients on the concatenated global batch.
- Queues and memory banks are constants: they are detached inside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kith.memory import chunked_topk
from kith.utils.device import float32_loss
from kith.utils.distributed import all_reduce_sum, gather_with_grad, rank, rank_offset, world_size

__all__ = [
    "all4one_feature_loss",
    "all4one_positional_encoding",
    "barlow_twins_loss",
    "byol_loss",
    "info_nce",
    "mean_shift_loss",
    "multi_positive_nt_xent",
    "nnclr_loss",
    "nt_xent",
    "prototype_nce",
    "relation_loss",
]


def _off_diagonal(x: Tensor) -> Tensor:
    """The n*(n-1) off-diagonal entries of a square (n, n) matrix, flattened."""
    n, m = x.shape
    assert n == m, "off-diagonal of a non-square matrix"
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


@float32_loss
def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.2) -> Tensor:
    """SimCLR NT-Xent over the 2B views (g).

    ``z1, z2: (B, D)`` are the two views of the same B images (un-normalised). With
    ``u = normalize(cat(z1, z2))`` and ``s_ik = u_i · u_k / T`` over all 2N views of the global
    batch (N = B x world size, gathered with gradient), each of this rank's 2B anchors i gets:

        l_i = -log( exp(s_i,pos(i)) / Σ_{k ≠ i} exp(s_ik) )

    where pos(i) is the other view of the same image and the self-similarity is excluded from the
    denominator. Returns ``mean_i l_i`` over the 2B local anchors.
    """
    b = z1.shape[0]
    u1 = F.normalize(z1, dim=-1)
    u2 = F.normalize(z2, dim=-1)
    g1 = gather_with_grad(u1)  # (N, D)
    g2 = gather_with_grad(u2)
    n = g1.shape[0]
    anchors = torch.cat([u1, u2], dim=0)  # (2B, D)
    keys = torch.cat([g1, g2], dim=0)  # (2N, D): view-1 block, then view-2 block
    logits = anchors @ keys.T / temperature  # (2B, 2N)

    idx = rank_offset(b) + torch.arange(b, device=z1.device)  # this rank's images in the global batch
    self_idx = torch.cat([idx, idx + n])
    pos_idx = torch.cat([idx + n, idx])
    rows = torch.arange(2 * b, device=z1.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, self_idx] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, pos_idx)


@float32_loss
def multi_positive_nt_xent(z: Tensor, crops: int, temperature: float = 0.2) -> Tensor:
    """SimCLR over several crops of each image (g): every other crop of the same image is a positive
    (solo-learn's ``simclr_loss_func`` with repeated indexes, its multi-crop SimCLR).

    ``z: (crops * B, D)`` un-normalised, crop-major (row ``c * B + b`` is crop c of image b). With
    ``u = normalize(z)`` gathered over ranks with gradient and ``s_ij = u_i · u_j / T``, each of the
    ``crops * B`` local anchors i gets:

        l_i = -log( Σ_{p ∈ P(i)} exp(s_ip) / Σ_{j ≠ i} exp(s_ij) )

    P(i): the other ``crops - 1`` crops of i's image, over the whole gathered batch; the denominator
    is every other row (self excluded). Returns ``mean_i l_i``. With ``crops = 2`` this is `nt_xent`.
    """
    nb = z.shape[0]
    b = nb // crops
    u = F.normalize(z, dim=-1)
    keys = gather_with_grad(u)  # (world * crops * B, D): rank r's rows are its crops * B, crop-major
    logits = u @ keys.T / temperature
    col = torch.arange(keys.shape[0], device=z.device)
    key_image = col // nb * b + col % b  # global image index of every gathered row
    row = torch.arange(nb, device=z.device)
    anchor_image = rank_offset(b) + row % b
    own = torch.zeros_like(logits, dtype=torch.bool)
    own[row, rank() * nb + row] = True
    logits = logits.masked_fill(own, float("-inf"))
    positive = (anchor_image[:, None] == key_image[None, :]) & ~own
    pos = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
    return (torch.logsumexp(logits, dim=1) - pos).mean()


@float32_loss
def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL regression loss ``mean_i (2 - 2 cos(p_i, sg(z_i)))``, in [0, 4].

    ``p: (B, D)`` online prediction, ``z: (B, D)`` target projection (detached inside: no
    gradient reaches z). Both un-normalised.
    """
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


@float32_loss
def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float = 0.2) -> Tensor:
    """MoCo InfoNCE with a queue of negatives.

    ``q: (B, D)`` queries, ``k: (B, D)`` positive keys (both normalised inside),
    ``queue: (K, D)`` already-normalised negatives (detached). Logits
    ``[q_i·k_i | q_i·queueᵀ] / T`` of shape (B, 1 + K), target class 0; mean cross-entropy.
    Multi-crop: ``q: (n * B, D)``, n crops of each image crop-major, each with its image's key
    ``k_{i mod B}`` (k repeated n times); the mean is over all n * B rows.
    """
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1)
    if q.shape[0] != k.shape[0]:
        k = k.repeat(q.shape[0] // k.shape[0], 1)
    pos = (q * k).sum(dim=-1, keepdim=True)  # (B, 1)
    neg = q @ queue.detach().to(q.dtype).T  # (B, K)
    logits = torch.cat([pos, neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


@float32_loss
def nnclr_loss(anchors: Tensor, p: Tensor, temperature: float = 0.2) -> Tensor:
    """NNCLR contrastive loss (g on p): ``CE(normalize(anchors) @ normalize(gather(p))ᵀ / T, labels)``.

    ``anchors: (B, D)`` (NNCLR: the support-set nearest neighbours of view 1; All4One: also
    the transformer centroids), ``p: (B, D)`` predictions of the other view, gathered over ranks
    with gradient. ``labels = rank_offset(B) + arange(B)``. This is also All4One's
    ``nnclr(a, b, T)``. Mean over the B local anchors.
    """
    b = anchors.shape[0]
    anchors = F.normalize(anchors, dim=-1)
    p = gather_with_grad(F.normalize(p, dim=-1))
    logits = anchors @ p.T / temperature  # (B, N)
    labels = rank_offset(b) + torch.arange(b, device=anchors.device)
    return F.cross_entropy(logits, labels)


@float32_loss
def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float = 0.0051, scale: float = 0.1) -> Tensor:
    """Barlow Twins redundancy-reduction loss over the global batch (g).

    ``z1, z2: (B, D)``. Each is batch-normalised without affine parameters over the *global*
    batch (mean and biased variance all-reduced over ranks, eps 1e-5, as SyncBN would), then:

        c = Σ_ranks z1ᵀ z2 / N          (D, D), N = global batch size, all-reduced once
        L = scale * ( Σ_i (1 - c_ii)² + λ Σ_{i≠j} c_ij² )

    The all-reduce is autograd-aware (:func:`kith.utils.distributed.all_reduce_sum`) and c is divided by
    the global N exactly once, so DDP gradients equal the single-process ones (no world-size factor:
    lightly bug #1977). Computed in float32 even under autocast.
    """
    n = z1.shape[0] * world_size()
    eps = 1e-5
    z = torch.stack([z1, z2])  # (2, B, D)
    mean = all_reduce_sum(z.sum(dim=1, keepdim=True)) / n  # (2, 1, D)
    centred = z - mean
    var = all_reduce_sum(centred.pow(2).sum(dim=1, keepdim=True)) / n  # biased
    zn = centred / torch.sqrt(var + eps)
    c = all_reduce_sum(zn[0].T @ zn[1]) / n  # (D, D)
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = _off_diagonal(c).pow(2).sum()
    return scale * (on_diag + lambd * off_diag)


@float32_loss
def relation_loss(
    q: Tensor, k: Tensor, queue: Tensor, t_student: float = 0.1, t_teacher: float = 0.04
) -> Tensor:
    """ReSSL relational loss: the student's relation to the queue matches the teacher's.

    ``q: (B, D)`` student (strong view), ``k: (B, D)`` teacher (weak view, detached inside), both
    normalised inside; ``queue: (K, D)`` already normalised (detached):

        L = mean_i  -Σ_j softmax(k_i·queueᵀ / t_teacher)_j · log_softmax(q_i·queueᵀ / t_student)_j

    The teacher is the sharper one (0.04). Similarities and softmaxes are computed in float32 even
    under autocast (inputs are cast up), as the official code.

    Multi-crop (official ``ressl_multi.py``): ``q: (n * B, D)``, the n student crops of each image
    crop-major, ``k: (B, D)`` one teacher crop; the teacher's distribution of image b is the target of
    every row ``c * B + b`` (``logits_k.repeat(n, 1)``) and L is the plain mean over all n * B rows.
    """
    q = F.normalize(q, dim=-1)
    k = F.normalize(k.detach(), dim=-1)
    queue = queue.detach()
    teacher = F.softmax(k @ queue.T / t_teacher, dim=1)
    if q.shape[0] != k.shape[0]:  # computed once per image, repeated per student crop
        teacher = teacher.repeat(q.shape[0] // k.shape[0], 1)
    student = F.log_softmax(q @ queue.T / t_student, dim=1)
    return -(teacher * student).sum(dim=1).mean()


@float32_loss
def mean_shift_loss(
    query: Tensor, target: Tensor, bank: Tensor, k: int = 5, *, nn_idx: Tensor | None = None
) -> Tensor:
    """MSF mean-shift loss: pull the query towards the k nearest neighbours of the target.

    ``query, target: (B, D)`` (normalised inside), ``bank: (N, D)`` already normalised and already
    holding the current (gathered) targets, detached:

        nn_i = topk(target_i · bankᵀ, k)                       (by the TARGET's similarity)
        L    = mean_i  mean_{j ∈ nn_i} (2 - 2 query_i · bank_j)

    ``nn_idx: (B, k)`` may pass the neighbours already found (MSF asks its bank,
    :meth:`kith.memory.Queue.neighbours`, and also computes purity from them); else they are
    searched here with :func:`kith.memory.chunked_topk`. With k=1 and the bank holding the target,
    L = byol_loss(query, target).
    """
    if nn_idx is None:
        nn_idx = chunked_topk(F.normalize(target.detach(), dim=-1), bank.detach(), k)[1]
    q = F.normalize(query, dim=-1)
    neighbours = bank.detach()[nn_idx].to(q.dtype)  # (B, k, D)
    dots = torch.einsum("bd,bkd->bk", q, neighbours)
    return (2 - 2 * dots).mean()


@float32_loss
def all4one_feature_loss(zt1: Tensor, z2: Tensor, zt2: Tensor, z1: Tensor) -> Tensor:
    """All4One's feature (redundancy-reduction) term L_feature, as the official code.

    ``zt1, zt2: (B, D)`` momentum embeddings of views 1 and 2 (All4One passes them row-normalised,
    no grad), ``z1, z2: (B, D)`` online projector outputs. Only the column normalisation of the
    formula is applied here (local batch, not gathered):

        c_a = normalize(zt1, dim=0)ᵀ normalize(z2, dim=0);   c_b = normalize(zt2, dim=0)ᵀ normalize(z1, dim=0)
        on  = sqrt(½ (mean((diag c_a - 1)²) + mean((diag c_b - 1)²)))
        off = sqrt(½ (mean(offdiag(c_a)²) + mean(offdiag(c_b)²)))
        L   = 10 * (½ on + ½ off)
    """
    c_a = F.normalize(zt1, dim=0).T @ F.normalize(z2, dim=0)
    c_b = F.normalize(zt2, dim=0).T @ F.normalize(z1, dim=0)
    on = (0.5 * ((torch.diagonal(c_a) - 1).pow(2).mean() + (torch.diagonal(c_b) - 1).pow(2).mean())).sqrt()
    off = (0.5 * (_off_diagonal(c_a).pow(2).mean() + _off_diagonal(c_b).pow(2).mean())).sqrt()
    return 10 * (0.5 * on + 0.5 * off)


def all4one_positional_encoding(tokens: int = 5, dim: int = 256) -> Tensor:
    """The fixed (tokens, dim) sinusoidal table All4One adds to its token sequences (float32).

    Reproduces solo-learn's ``Summer(PositionalEncodingPermute1D(tokens))`` on a (B, tokens, dim)
    input: the sin/cos "positions" run along the dim axis and the channels are the tokens:

        PE[j, d] = sin(d·ω_{j//2}) for even j,  cos(d·ω_{j//2}) for odd j,
        ω_i = 10000^(-2i / C),  C = tokens rounded up to even (C = 6 for 5 tokens)

    computed in float32 the same way as positional_encodings' PositionalEncoding1D(channels=tokens).
    """
    channels = int(math.ceil(tokens / 2) * 2)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, channels, 2).float() / channels))  # (C/2,)
    pos = torch.arange(dim).float()
    angles = torch.einsum("i,j->ij", pos, inv_freq)  # (dim, C/2)
    table = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (dim, C): sin, cos interleaved
    return table[:, :tokens].T.contiguous()  # (tokens, dim)


@float32_loss
def prototype_nce(p: Tensor, assignments: Tensor, prototypes: Tensor, temperature: float = 0.1) -> Tensor:
    """SPCL inter-prototype term ``CE(normalize(p) @ normalize(prototypes)ᵀ / T, assignments)``.

    ``p: (B, D)`` predictions, ``assignments: (B,)`` long prototype index of each sample,
    ``prototypes: (K, D)`` centroids (both normalised inside). Only prototypes are negatives.
    Samples with assignment -1 (unknown) are ignored; mean over the others.
    """
    logits = F.normalize(p, dim=-1) @ F.normalize(prototypes, dim=-1).to(p.dtype).T / temperature
    return F.cross_entropy(logits, assignments.long(), ignore_index=-1)
