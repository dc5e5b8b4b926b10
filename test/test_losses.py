"""ZeroFlow distillation loss: the speed ramp at its breakpoints and the loss vs a numpy reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from zeroflow_training.losses import (LOSSES, DistillationLoss, LossError, get_loss, speed_weight,
                                      upstream_speed_weight)


def _flow_with_speed(speeds_mps, frame_rate=10.0) -> torch.Tensor:
    """Flows (m/frame) with the given speeds along a fixed oblique direction."""
    d = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    d = d / d.norm()
    return (torch.tensor(speeds_mps, dtype=torch.float64)[:, None] / frame_rate * d).float()


@pytest.mark.parametrize('speed, weight', [
    (0.0, 0.1), (0.3, 0.1), (0.4, 0.1),    # the paper's "0.1 below 0.4 m/s"
    (0.5, 0.1),                            # lower end of the ramp: 1.8 * 0.5 - 0.8 = 0.1
    (0.6, 0.28), (0.75, 0.55), (0.9, 0.82),  # on the ramp 1.8 s - 0.8
    (1.0, 1.0), (1.5, 1.0), (30.0, 1.0),   # full weight from 1 m/s
])
def test_speed_weight_breakpoints(speed, weight):
    w = speed_weight(_flow_with_speed([speed]))
    assert w.item() == pytest.approx(weight, abs=1e-5)


def test_speed_weight_is_continuous_monotone_and_uses_the_frame_rate():
    s = np.linspace(0, 2, 2001)
    w = speed_weight(_flow_with_speed(s)).numpy()
    assert np.all(np.diff(w) >= -1e-6) and np.abs(np.diff(w)).max() < 2e-3
    # 0.05 m/frame is 0.5 m/s at 10 Hz but 1.0 m/s at 20 Hz
    f = torch.tensor([[0.05, 0.0, 0.0]])
    assert speed_weight(f).item() == pytest.approx(0.1)
    assert speed_weight(f, frame_rate_hz=20.0).item() == pytest.approx(1.0)
    # the widely copied upstream expression is a constant, which is why we do not use it
    assert torch.all(upstream_speed_weight(_flow_with_speed(s)) == 0.1)


def test_loss_matches_numpy_reference_with_invalid_points_and_batches():
    rng = np.random.default_rng(0)
    n = 500
    pred = rng.normal(0, 0.1, (n, 3)).astype(np.float32)
    target = rng.normal(0, 0.1, (n, 3)).astype(np.float32)
    valid = rng.random(n) > 0.3
    batch = np.sort(rng.integers(0, 3, n))
    ref = []
    for b in range(3):
        m = (batch == b) & valid
        err = np.linalg.norm(pred[m] - target[m], axis=1)
        s = np.linalg.norm(target[m], axis=1) * 10
        w = np.where(s <= 0.5, 0.1, np.where(s >= 1.0, 1.0, 1.8 * s - 0.8))
        ref.append((err * w).mean())
    out = get_loss('zeroflow_speed_scaled')(torch.from_numpy(pred), torch.from_numpy(target),
                                            torch.from_numpy(valid), torch.from_numpy(batch), 3)
    assert out.loss.item() == pytest.approx(np.mean(ref), rel=1e-5)
    assert out.logs['valid_points'] == valid.sum()
    # invalid labels are ignored entirely, even if they are garbage
    t2 = target.copy()
    t2[~valid] = 1e6
    out2 = get_loss('zeroflow_speed_scaled')(torch.from_numpy(pred), torch.from_numpy(t2),
                                             torch.from_numpy(valid), torch.from_numpy(batch), 3)
    assert out2.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
    # the warm-up loss: the same weights on the squared error
    sq = get_loss('zeroflow_speed_scaled_sq')(torch.from_numpy(pred), torch.from_numpy(target),
                                              torch.from_numpy(valid), torch.from_numpy(batch), 3)
    ref_sq = []
    for b in range(3):
        m = (batch == b) & valid
        s = np.linalg.norm(target[m], axis=1) * 10
        w = np.where(s <= 0.5, 0.1, np.where(s >= 1.0, 1.0, 1.8 * s - 0.8))
        ref_sq.append((np.sum((pred[m] - target[m]) ** 2, axis=1) * w).mean())
    assert sq.loss.item() == pytest.approx(np.mean(ref_sq), rel=1e-5)
    plain = get_loss('epe')(torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(valid))
    m = valid
    assert plain.loss.item() == pytest.approx(np.linalg.norm(pred[m] - target[m], axis=1).mean(), rel=1e-5)


def test_loss_gradient_and_edge_cases():
    target = _flow_with_speed([0.2, 2.0])
    pred = target.clone().requires_grad_(True)
    loss = DistillationLoss()(pred, target).loss
    assert loss.item() == 0.0
    pred2 = (target + torch.tensor([[0.1, 0, 0], [0.1, 0, 0]])).requires_grad_(True)
    DistillationLoss()(pred2, target).loss.backward()
    # the slow point's gradient is 10x smaller than the fast one's (weights 0.1 vs 1.0)
    g = pred2.grad.norm(dim=1)
    assert g[1] / g[0] == pytest.approx(10.0, rel=1e-4)
    none_valid = DistillationLoss()(pred2, target, torch.zeros(2, dtype=torch.bool))
    assert none_valid.loss.item() == 0.0 and none_valid.loss.requires_grad


def test_bad_inputs_and_registry():
    with pytest.raises(LossError, match=r'pred: expected \(N,3\)'):
        DistillationLoss()(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(LossError, match='valid: expected a \\(4,\\) bool mask'):
        DistillationLoss()(torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(4))
    with pytest.raises(LossError, match=r"unknown loss 'l1'.*epe.*zeroflow_speed_scaled"):
        get_loss('l1')
    assert set(LOSSES) == {'zeroflow_speed_scaled', 'zeroflow_speed_scaled_sq', 'epe'}
    with pytest.raises(LossError, match="error: unknown 'cube'"):
        DistillationLoss(error='cube')


def _fit_constant(loss_name: str, target: torch.Tensor) -> torch.Tensor:
    """The one flow vector minimising the loss over all points (what a net predicts for points it
    cannot yet tell apart)."""
    c = torch.zeros(1, 3, requires_grad=True)
    opt = torch.optim.Adam([c], lr=0.01)
    loss_fn = get_loss(loss_name)
    for _ in range(1500):
        opt.zero_grad()
        loss_fn(c.expand_as(target), target).loss.backward()
        opt.step()
    return c.detach()[0]


def test_norm_loss_has_a_zero_flow_optimum_for_rare_movers_and_the_squared_warmup_does_not():
    # 97 static points, 3 movers at 0.5 m/frame (5 m/s), the ratio of movers in our training sweeps.
    # Under the paper's norm loss the best flow shared by all of them is a weighted geometric median:
    # exactly zero, so a student that cannot yet see motion gets no pull towards the movers (the
    # stall that made the shipped config use a squared warm-up). The squared loss's optimum is the
    # weighted mean, which points at the movers.
    target = torch.zeros(100, 3)
    target[:3, 0] = 0.5
    norm_opt = _fit_constant('zeroflow_speed_scaled', target)
    sq_opt = _fit_constant('zeroflow_speed_scaled_sq', target)
    assert norm_opt.norm().item() < 0.01
    expected = 3 * 1.0 * 0.5 / (3 * 1.0 + 97 * 0.1)  # speed weights 1.0 (movers) and 0.1 (static)
    assert sq_opt[0].item() == pytest.approx(expected, rel=0.02)
