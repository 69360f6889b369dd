"""kith.losses: each loss against an independent re-derivation of its SPEC formula (plain loops
and math, float64), plus gradient-flow, precision and special-case checks."""

from __future__ import annotations

import math

import pytest
import torch

from kith import losses as L
from kith.memory import chunked_topk


def _rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _unit(v):
    """L2-normalise a list of floats / 1-D tensor (reference helper, no torch.nn.functional)."""
    v = [float(a) for a in v]
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _rows(t):
    return [_unit(r) for r in t.double()]


def _lse(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def _unit_queue(k, d, seed):
    return torch.tensor(_rows(_rand(k, d, seed=seed)), dtype=torch.float32)


# ---------------------------------------------------------------- nt_xent


def test_nt_xent_matches_loop_reference():
    b, d, t = 6, 8, 0.2
    z1, z2 = _rand(b, d, seed=1), _rand(b, d, seed=2)
    views = _rows(z1) + _rows(z2)  # 2B views; view i and i+B are the same image
    losses = []
    for i in range(2 * b):
        pos = i + b if i < b else i - b
        s = {k: _dot(views[i], views[k]) / t for k in range(2 * b)}
        denom = sum(math.exp(s[k]) for k in range(2 * b) if k != i)
        losses.append(-math.log(math.exp(s[pos]) / denom))
    ref = sum(losses) / len(losses)
    assert L.nt_xent(z1, z2, temperature=t).item() == pytest.approx(ref, rel=1e-5)
    # default temperature is 0.2
    assert L.nt_xent(z1, z2).item() == pytest.approx(ref, rel=1e-5)


def test_nt_xent_scale_invariant_and_symmetric():
    z1, z2 = _rand(5, 7, seed=3), _rand(5, 7, seed=4)
    a = L.nt_xent(z1, z2, 0.5)
    assert torch.allclose(a, L.nt_xent(3 * z1, 0.1 * z2, 0.5), atol=1e-6)
    assert torch.allclose(a, L.nt_xent(z2, z1, 0.5), atol=1e-6)


# ---------------------------------------------------------------- byol


def test_byol_matches_formula_and_range():
    p, z = _rand(7, 5, seed=5), _rand(7, 5, seed=6)
    ref = sum(2 - 2 * _dot(a, b) for a, b in zip(_rows(p), _rows(z))) / 7
    out = L.byol_loss(p, z)
    assert out.item() == pytest.approx(ref, rel=1e-5)
    assert 0 <= out.item() <= 4
    assert L.byol_loss(p, p).item() == pytest.approx(0.0, abs=1e-6)
    assert L.byol_loss(p, 2.5 * p).item() == pytest.approx(0.0, abs=1e-6)
    assert L.byol_loss(p, -p).item() == pytest.approx(4.0, abs=1e-6)


def test_byol_no_gradient_to_target():
    p = _rand(4, 6, seed=7).requires_grad_()
    z = _rand(4, 6, seed=8).requires_grad_()
    L.byol_loss(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None


# ---------------------------------------------------------------- info_nce


def test_info_nce_matches_loop_reference():
    b, d, k, t = 5, 6, 9, 0.2
    q, key = _rand(b, d, seed=9), _rand(b, d, seed=10)
    queue = _unit_queue(k, d, seed=11)
    qs, ks, qu = _rows(q), _rows(key), [list(map(float, r)) for r in queue.double()]
    ref = 0.0
    for i in range(b):
        logits = [_dot(qs[i], ks[i]) / t] + [_dot(qs[i], qu[j]) / t for j in range(k)]
        ref += -(logits[0] - _lse(logits)) / b
    assert L.info_nce(q, key, queue, temperature=t).item() == pytest.approx(ref, rel=1e-5)


def test_info_nce_queue_not_renormalised_and_detached():
    q, key = _rand(3, 4, seed=12), _rand(3, 4, seed=13)
    queue = _unit_queue(6, 4, seed=14)
    # scaling the queue changes the loss: it is used as given (already normalised)
    assert not torch.allclose(L.info_nce(q, key, queue), L.info_nce(q, key, 2 * queue))
    queue_param = queue.clone().requires_grad_()
    L.info_nce(q.requires_grad_(), key, queue_param).backward()
    assert queue_param.grad is None and q.grad is not None


# ---------------------------------------------------------------- nnclr


def test_nnclr_matches_loop_reference():
    b, d, t = 6, 5, 0.2
    anchors, p = _rand(b, d, seed=15), _rand(b, d, seed=16)
    ns, ps = _rows(anchors), _rows(p)
    ref = 0.0
    for i in range(b):
        logits = [_dot(ns[i], ps[j]) / t for j in range(b)]
        ref += -(logits[i] - _lse(logits)) / b
    assert L.nnclr_loss(anchors=anchors, p=p, temperature=t).item() == pytest.approx(ref, rel=1e-5)
    assert L.nnclr_loss(anchors, p).item() == pytest.approx(ref, rel=1e-5)


# ---------------------------------------------------------------- barlow twins


def _barlow_reference(z1, z2, lambd, scale):
    n, d = z1.shape

    def bn(z):
        cols = []
        for j in range(d):
            col = [float(z[i, j]) for i in range(n)]
            m = sum(col) / n
            v = sum((x - m) ** 2 for x in col) / n  # biased
            cols.append([(x - m) / math.sqrt(v + 1e-5) for x in col])
        return cols  # cols[j][i]

    a, b = bn(z1), bn(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[i][s] * b[j][s] for s in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lambd * c**2
    return scale * loss


def test_barlow_matches_formula():
    z1, z2 = _rand(10, 6, seed=17), _rand(10, 6, seed=18) + 0.5 * _rand(10, 6, seed=17)
    ref = _barlow_reference(z1.double(), z2.double(), 0.0051, 0.1)
    assert L.barlow_twins_loss(z1, z2).item() == pytest.approx(ref, rel=1e-4)
    ref2 = _barlow_reference(z1.double(), z2.double(), 0.5, 2.0)
    assert L.barlow_twins_loss(z1, z2, lambd=0.5, scale=2.0).item() == pytest.approx(ref2, rel=1e-4)


def test_barlow_float32_under_autocast():
    z1, z2 = _rand(8, 4, seed=19), _rand(8, 4, seed=20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = L.barlow_twins_loss(z1, z2)
    assert out.dtype == torch.float32
    assert torch.allclose(out, L.barlow_twins_loss(z1, z2), atol=1e-6)


# ---------------------------------------------------------------- relation (ReSSL)


def test_relation_loss_matches_loop_reference():
    b, d, k = 4, 6, 7
    q, key = _rand(b, d, seed=21), _rand(b, d, seed=22)
    queue = _unit_queue(k, d, seed=23)
    qs, ks, qu = _rows(q), _rows(key), [list(map(float, r)) for r in queue.double()]
    ref = 0.0
    for i in range(b):
        lt = [_dot(ks[i], qu[j]) / 0.04 for j in range(k)]
        ls = [_dot(qs[i], qu[j]) / 0.1 for j in range(k)]
        zt, zs = _lse(lt), _lse(ls)
        ref += -sum(math.exp(lt[j] - zt) * (ls[j] - zs) for j in range(k)) / b
    assert L.relation_loss(q, key, queue).item() == pytest.approx(ref, rel=1e-5)
    # the temperatures are not interchangeable: the teacher is the sharper one
    swapped = L.relation_loss(q, key, queue, t_student=0.04, t_teacher=0.1).item()
    assert swapped != pytest.approx(ref, rel=1e-3)


def test_relation_loss_fp32_under_bf16_autocast():
    q, key = _rand(4, 8, seed=24), _rand(4, 8, seed=25)
    queue = _unit_queue(16, 8, seed=26)
    qb, kb = q.bfloat16().requires_grad_(), key.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = L.relation_loss(qb, kb, queue)
    assert out.dtype == torch.float32
    # identical to the float32 computation on the (upcast) same values
    ref = L.relation_loss(qb.detach().float(), kb.float(), queue)
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-6)
    out.backward()
    assert qb.grad is not None and qb.grad.dtype == torch.bfloat16


def test_relation_loss_no_gradient_to_teacher():
    q = _rand(3, 5, seed=27).requires_grad_()
    key = _rand(3, 5, seed=28).requires_grad_()
    L.relation_loss(q, key, _unit_queue(6, 5, seed=29)).backward()
    assert q.grad is not None and key.grad is None


# ---------------------------------------------------------------- mean shift (MSF)


def _target_neighbours(target, bank, k):
    """The neighbours MSF passes to mean_shift_loss: the bank's top-k by the target's similarity."""
    return chunked_topk(torch.nn.functional.normalize(target, dim=-1), bank, k)[1]


def test_mean_shift_matches_loop_reference():
    b, d, n, k = 4, 5, 12, 3
    query, target = _rand(b, d, seed=30), _rand(b, d, seed=31)
    bank = _unit_queue(n, d, seed=32)
    qs, ts, bk = _rows(query), _rows(target), [list(map(float, r)) for r in bank.double()]
    ref = 0.0
    for i in range(b):
        nn = sorted(range(n), key=lambda j: -_dot(ts[i], bk[j]))[:k]
        ref += sum(2 - 2 * _dot(qs[i], bk[j]) for j in nn) / k / b
    assert L.mean_shift_loss(query, target, bank, k=k).item() == pytest.approx(ref, rel=1e-5)
    idx = _target_neighbours(target, bank, k)
    assert idx.shape == (b, k)
    for i in range(b):
        assert idx[i].tolist() == sorted(range(n), key=lambda j: -_dot(ts[i], bk[j]))[:k]
    assert torch.allclose(
        L.mean_shift_loss(query, target, bank, k=k, nn_idx=idx), L.mean_shift_loss(query, target, bank, k=k)
    )


def test_mean_shift_k1_equals_byol_when_bank_holds_target():
    b, d = 6, 8
    query, target = _rand(b, d, seed=33), _rand(b, d, seed=34)
    others = _unit_queue(20, d, seed=35)
    bank = torch.cat([others[:7], torch.nn.functional.normalize(target, dim=1), others[7:]])
    out = L.mean_shift_loss(query, target, bank, k=1)
    assert torch.allclose(out, L.byol_loss(query, target), atol=1e-6)
    assert _target_neighbours(target, bank, 1).squeeze(1).tolist() == list(range(7, 7 + b))


def test_mean_shift_neighbours_chosen_by_target_not_query():
    # bank e0, e1, e2; the target is closest to e0, the query closest to e1.
    bank = torch.eye(3)
    target = torch.tensor([[1.0, 0.1, 0.0]])
    query = torch.tensor([[0.0, 1.0, 0.2]])
    idx = _target_neighbours(target, bank, 1)
    assert idx.item() == 0
    q = _unit(query[0])
    expected = 2 - 2 * q[0]  # distance of the query to e0, not to its own nearest e1
    assert L.mean_shift_loss(query, target, bank, k=1).item() == pytest.approx(expected, rel=1e-6)
    assert L.mean_shift_loss(query, target, bank, k=1).item() != pytest.approx(2 - 2 * q[1], rel=1e-3)


def test_mean_shift_gradient_only_to_query():
    query = _rand(3, 4, seed=36).requires_grad_()
    target = _rand(3, 4, seed=37).requires_grad_()
    bank = _unit_queue(9, 4, seed=38).requires_grad_()
    L.mean_shift_loss(query, target, bank, k=2).backward()
    assert query.grad is not None and query.grad.abs().sum() > 0
    assert target.grad is None and bank.grad is None


# ---------------------------------------------------------------- All4One


def test_all4one_feature_loss_matches_formula():
    b, d = 7, 4
    zt1, z2, zt2, z1 = (_rand(b, d, seed=s) for s in (40, 41, 42, 43))

    def colnorm(z):  # normalise each column over the batch
        cols = [_unit([float(z[i, j]) for i in range(b)]) for j in range(d)]
        return cols  # cols[j][i]

    def corr(a, bb):
        ca, cb = colnorm(a), colnorm(bb)
        return [[_dot(ca[i], cb[j]) for j in range(d)] for i in range(d)]

    ca, cb = corr(zt1, z2), corr(zt2, z1)
    def diag(c):
        return sum((c[i][i] - 1) ** 2 for i in range(d)) / d

    def offd(c):
        return sum(c[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / (d * d - d)

    on = math.sqrt(0.5 * (diag(ca) + diag(cb)))
    off = math.sqrt(0.5 * (offd(ca) + offd(cb)))
    ref = 10 * (0.5 * on + 0.5 * off)
    assert L.all4one_feature_loss(zt1, z2, zt2, z1).item() == pytest.approx(ref, rel=1e-5)


def test_all4one_positional_encoding_table():
    pe = L.all4one_positional_encoding()
    assert pe.shape == (5, 256) and pe.dtype == torch.float32
    # 5 tokens -> channels rounded up to 6 -> omega_i = 10000^(-2i/6)
    omega = [10000 ** (-2 * i / 6) for i in range(3)]
    for j, dd in [(0, 0), (0, 7), (1, 0), (1, 3), (2, 1), (2, 100), (3, 5), (3, 255), (4, 17), (4, 200)]:
        f = math.sin if j % 2 == 0 else math.cos
        assert pe[j, dd].item() == pytest.approx(f(dd * omega[j // 2]), abs=1e-4), (j, dd)
    assert torch.all(pe[0::2, 0] == 0) and torch.all(pe[1::2, 0] == 1)
    # generalisation: even token counts use C = tokens
    pe4 = L.all4one_positional_encoding(tokens=4, dim=16)
    assert pe4.shape == (4, 16)
    assert pe4[3, 9].item() == pytest.approx(math.cos(9 * 10000 ** (-2 / 4)), abs=1e-5)


def test_all4one_positional_encoding_matches_positional_encodings_reference():
    # re-implementation of positional_encodings' Summer(PositionalEncodingPermute1D(5)) on (B, 5, 256)
    x = torch.zeros(2, 5, 256)
    ch = 6
    inv_freq = 1.0 / (10000 ** (torch.arange(0, ch, 2).float() / ch))
    pos = torch.arange(256).float()
    sin_inp = pos[:, None] * inv_freq[None, :]
    emb = torch.zeros(256, ch)
    emb[:, 0::2], emb[:, 1::2] = sin_inp.sin(), sin_inp.cos()
    summed = x + emb[None, :, :5].permute(0, 2, 1)
    assert torch.allclose(summed[0], L.all4one_positional_encoding(5, 256), atol=1e-6)


# ---------------------------------------------------------------- prototype NCE (SPCL)


def test_prototype_nce_matches_loop_reference():
    b, d, k, t = 5, 4, 3, 0.1
    p = _rand(b, d, seed=44)
    protos = _rand(k, d, seed=45)
    assign = torch.tensor([0, 2, 1, 1, 0])
    ps, cs = _rows(p), _rows(protos)
    ref = 0.0
    for i in range(b):
        logits = [_dot(ps[i], cs[j]) / t for j in range(k)]
        ref += -(logits[int(assign[i])] - _lse(logits)) / b
    assert L.prototype_nce(p, assign, protos, temperature=t).item() == pytest.approx(ref, rel=1e-5)
    assert L.prototype_nce(p, assign, 3 * protos).item() == pytest.approx(ref, rel=1e-5)


# ---------------------------------------------------------------- common properties


# (loss of (a, b), whether b must receive a gradient): every side that the formula does not detach
GRADIENT_SIDES = {
    "nt_xent": (lambda a, b: L.nt_xent(a, b), True),
    "nnclr": (lambda a, b: L.nnclr_loss(a, b), True),  # b: the prediction side (gathered with grad)
    "barlow_twins": (lambda a, b: L.barlow_twins_loss(a, b), True),
    "all4one_feature": (lambda a, b: L.all4one_feature_loss(b.detach(), a, b.detach(), b), True),
    "byol": (lambda a, b: L.byol_loss(a, b), False),  # b: the target, stop-gradient
}


@pytest.mark.parametrize("name", list(GRADIENT_SIDES))
def test_gradients_flow_to_both_sides(name):
    fn, b_gets_grad = GRADIENT_SIDES[name]
    a = _rand(6, 5, seed=46).requires_grad_()
    b = _rand(6, 5, seed=47).requires_grad_()
    out = fn(a, b)
    assert out.ndim == 0 and torch.isfinite(out)
    out.backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    if b_gets_grad:
        assert b.grad is not None and torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0
    else:
        assert b.grad is None
