import math

import torch

from kith.nn.ema import cosine_tau, ema_update, momentum_copy


def test_ema_update_is_the_formula_and_the_copy_is_frozen():
    online = torch.nn.Linear(3, 2)
    target = momentum_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    before = [p.clone() for p in target.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    ema_update(target, online, 0.9)
    for old, new, o in zip(before, target.parameters(), online.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * o)


def test_cosine_tau_runs_from_base_to_final():
    assert cosine_tau(0, 10, 0.99, 1.0) == 0.99
    assert math.isclose(cosine_tau(10, 10, 0.99, 1.0), 1.0)
