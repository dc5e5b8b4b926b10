"""NSFP teacher: pieces against independent references, the optimiser on hand-made motion, the
batched path against the unbatched one, and bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from zeroflow_training.teacher.nn_search import DistanceGrid, nn_brute, nn_kdtree
from zeroflow_training.teacher.nsfp import (MaskedAdam, NSFPConfig, NSFPError, mlp_forward, run_nsfp,
                                            run_nsfp_batch, truncated_chamfer, _init_mlp, _stack_params)

torch.set_num_threads(1)


def _surface_scene(rng: np.random.Generator, n: int = 1500) -> np.ndarray:
    """Points on the faces of a few boxes and a wall: lidar-like 2-D surfaces, not a volume."""
    pts = []
    for (cx, cy), (lx, ly, h) in [((4, 2), (4.5, 1.8, 1.5)), ((-3, -4), (2, 2, 2)), ((0, 8), (16, 0.3, 3))]:
        m = n // 3
        u = rng.uniform(-0.5, 0.5, (m, 3)) * (lx, ly, h)
        face = rng.integers(0, 3, m)
        u[face == 0, 0] = np.sign(u[face == 0, 0]) * lx / 2
        u[face == 1, 1] = np.sign(u[face == 1, 1]) * ly / 2
        u[face == 2, 2] = h / 2
        pts.append(u + (cx, cy, h / 2))
    return np.concatenate(pts).astype(np.float32)


def _rot_z(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


# ---------------------------------------------------------------------------------------------
# pieces vs independent references

def test_mlp_forward_matches_torch_sequential():
    gen = torch.Generator().manual_seed(3)
    layers = _init_mlp(gen, 16, 3)
    seq = []
    for i, (w, b) in enumerate(layers):
        lin = torch.nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            lin.weight.copy_(w.t())
            lin.bias.copy_(b)
        seq += [lin] + ([torch.nn.ReLU()] if i < len(layers) - 1 else [])
    net = torch.nn.Sequential(*seq)
    x = torch.randn(1, 50, 3, generator=gen)
    params = _stack_params([layers], 'cpu')
    torch.testing.assert_close(mlp_forward(params, x), net(x), rtol=1e-5, atol=1e-6)
    # nn.Linear's default init bound is 1/sqrt(fan_in) for weights and biases.
    assert float(layers[1][0].abs().max()) <= 1 / math.sqrt(16) + 1e-7


def test_masked_adam_matches_torch_adam_and_freezes_inactive_pairs():
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(2, 4, 3, generator=gen)
    mine = [p0.clone().requires_grad_(True)]
    ref = [p0.clone().requires_grad_(True)]
    opt = MaskedAdam(mine, lr=0.008, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    topt = torch.optim.Adam(ref, lr=0.008, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    targets = [torch.randn(2, 4, 3, generator=gen) for _ in range(25)]
    for t in targets:
        opt.zero_grad()
        topt.zero_grad()
        ((mine[0] - t) ** 2).sum().backward()
        ((ref[0] - t) ** 2).sum().backward()
        opt.step(torch.tensor([True, True]))
        topt.step()
    torch.testing.assert_close(mine[0], ref[0], rtol=1e-6, atol=1e-7)
    before = mine[0].detach().clone()
    opt.zero_grad()
    ((mine[0] - targets[0]) ** 2).sum().backward()
    opt.step(torch.tensor([False, True]))
    assert torch.equal(mine[0][0], before[0])
    assert not torch.equal(mine[0][1], before[1])


def _numpy_chamfer(a: np.ndarray, b: np.ndarray, trunc: float) -> float:
    d = ((a[:, None, :].astype(np.float64) - b[None].astype(np.float64)) ** 2).sum(-1)
    da, db = d.min(1), d.min(0)
    return float(np.where(da < trunc, da, 0).mean() + np.where(db < trunc, db, 0).mean())


@pytest.mark.parametrize('engine', ['brute', 'kdtree'])
def test_truncated_chamfer_matches_numpy_with_padding(engine):
    rng = np.random.default_rng(1)
    a = [rng.normal(0, 1.5, (40, 3)), rng.normal(0, 1.0, (25, 3))]
    b = [rng.normal(0.2, 1.5, (30, 3)), rng.normal(0, 1.0, (35, 3))]
    A = torch.zeros(2, 40, 3)
    B = torch.full((2, 35, 3), 1e3)  # padding far away must be ignored, not matched
    am = torch.zeros(2, 40, dtype=torch.bool)
    bm = torch.zeros(2, 35, dtype=torch.bool)
    for k in range(2):
        A[k, :len(a[k])] = torch.from_numpy(a[k]).float()
        am[k, :len(a[k])] = True
        B[k, :len(b[k])] = torch.from_numpy(b[k]).float()
        bm[k, :len(b[k])] = True
    got = truncated_chamfer(A, am, B, bm, engine, 2.0)
    want = [_numpy_chamfer(a[k].astype(np.float32), b[k].astype(np.float32), 2.0) for k in range(2)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    # Truncation really drops pairs (the clouds are spread enough to have squared gaps > 2).
    assert _numpy_chamfer(a[0], b[0], 1e9) > want[0]


def test_nn_engines_agree_with_bruteforce_indices():
    rng = np.random.default_rng(2)
    q = torch.from_numpy(rng.normal(size=(2, 60, 3)).astype(np.float32))
    t = torch.from_numpy(rng.normal(size=(2, 50, 3)).astype(np.float32))
    qm = torch.ones(2, 60, dtype=torch.bool)
    tm = torch.ones(2, 50, dtype=torch.bool)
    tm[1, 40:] = False
    want = []
    for k in range(2):
        n = int(tm[k].sum())
        d = ((q[k, :, None] - t[k, None, :n]) ** 2).sum(-1)
        want.append(d.argmin(1))
    want = torch.stack(want)
    assert torch.equal(nn_brute(q, qm, t, tm), want)
    assert torch.equal(nn_kdtree(q, qm, t, tm), want)
    # The GPU formulation (one matmul, centred) must find the same neighbours, here far from the
    # origin where an uncentred |t|^2 - 2 q.t would lose the centimetres to cancellation.
    off = torch.tensor([40.0, -35.0, 2.0])
    assert torch.equal(nn_brute(q * 0.05 + off, qm, t * 0.05 + off, tm, exact=False), want)


def test_distance_grid_interpolates_exact_distances():
    rng = np.random.default_rng(4)
    target = _surface_scene(rng, 600)
    grid = DistanceGrid([target], voxel=0.1, max_dist=1.5, device='cpu')
    tree = cKDTree(target)
    near = target[rng.integers(0, len(target), 300)] + rng.normal(0, 0.4, (300, 3)).astype(np.float32)
    exact, _ = tree.query(near)
    got = grid.distance(torch.from_numpy(near)[None])[0].numpy()
    inside = exact < 1.3
    # Trilinear interpolation of a 1-Lipschitz function: error <= half the voxel diagonal.
    assert np.abs(got[inside] - exact[inside]).max() <= 0.5 * math.sqrt(3) * 0.1 + 1e-4
    assert np.abs(got[inside] - exact[inside]).mean() < 0.03
    far = np.array([[100.0, 100.0, 100.0]], dtype=np.float32)
    assert float(grid.distance(torch.from_numpy(far)[None])) >= 1.5 - 1e-6
    q = torch.from_numpy(near[:5])[None].requires_grad_(True)
    grid.distance(q).sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# the optimiser

@pytest.mark.parametrize('fast', [True, False])
def test_recovers_rigid_motion_of_a_moving_object(fast):
    rng = np.random.default_rng(0)
    pc0 = _surface_scene(rng, 900)
    gt = np.zeros_like(pc0)
    obj = pc0[:, 0] > 1.5  # the first box (a car) moves; the rest is static
    R = _rot_z(0.03)
    c = pc0[obj].mean(0)
    gt[obj] = ((pc0[obj] - c) @ R.T + c + (0.6, 0.15, 0.0) - pc0[obj]).astype(np.float32)
    pc1 = (pc0 + gt)[rng.permutation(len(pc0))]  # no point correspondence by index
    cfg = NSFPConfig(fast=fast, fit_points=450, fast_max_iters=200, max_iters=200, hidden_units=64)
    flow, info = run_nsfp(pc0, pc1, cfg)
    assert info['status'] == 'ok' and flow.shape == pc0.shape and flow.dtype == np.float32
    epe = np.linalg.norm(flow - gt, axis=1)
    # Zero flow would score 0.62 m on the car; NSFP must get the motion to a few centimetres.
    assert epe[obj].mean() < 0.08, epe[obj].mean()
    assert epe[~obj].mean() < 0.05, epe[~obj].mean()
    assert 0 < info['iterations'] <= 200 and info['seconds'] > 0


def test_batched_equals_unbatched_and_early_stop_is_per_pair():
    rng = np.random.default_rng(5)
    pairs = []
    for n, shift in ((150, 0.3), (220, 0.1), (90, 0.5)):
        a = rng.normal(0, 2, (n, 3)).astype(np.float32)
        pairs.append((a, (a + (shift, 0, 0)).astype(np.float32)))
    # Patience 3 with a min_delta so large nothing counts as an improvement: every pair stops at
    # iteration 4 (the first value only seeds the reference, then three bad ones).
    cfg = NSFPConfig(fast=True, fit_points=120, fast_max_iters=12, hidden_units=32, hidden_layers=3)
    seeds = [11, 12, 13]
    batched = run_nsfp_batch(pairs, cfg, 'cpu', seeds)
    for (a, b), s, (fb, ib) in zip(pairs, seeds, batched):
        f1, i1 = run_nsfp(a, b, cfg, seed=s)
        np.testing.assert_allclose(fb, f1, rtol=1e-4, atol=1e-5)
        assert ib['iterations'] == i1['iterations'] and ib['batch'] == 3 and i1['batch'] == 1
        assert ib['fit_points'] == min(len(a), 120)
    stop_cfg = NSFPConfig(fast=False, max_iters=50, patience=3, min_delta=1e9, hidden_units=16,
                          hidden_layers=2)
    out = run_nsfp_batch(pairs, stop_cfg, 'cpu', seeds)
    assert [o[1]['iterations'] for o in out] == [4, 4, 4]
    assert all(o[1]['stop'] == 'early_stop' for o in out)


def test_a_stopped_pair_is_frozen_while_others_continue():
    rng = np.random.default_rng(6)
    a = rng.normal(0, 2, (80, 3)).astype(np.float32)
    b = (a + (0.4, 0, 0)).astype(np.float32)
    cfg = NSFPConfig(fast=False, max_iters=30, patience=5, min_delta=0.0, hidden_units=16, hidden_layers=2)
    # Pair 0's target is 100 m away: its forward term is truncated to a constant 0, only the cycle
    # term moves and soon stalls, so it stops early; pair 1 keeps improving until the cap.
    far = (a + 100.0).astype(np.float32)
    res = run_nsfp_batch([(a, far), (a, b)], cfg, 'cpu', [1, 2])
    alone = run_nsfp(a, far, cfg, seed=1)
    assert res[0][1]['stop'] == 'early_stop' and res[0][1]['iterations'] < 30
    assert res[0][1]['iterations'] == alone[1]['iterations']
    assert res[1][1]['iterations'] == 30 and res[1][1]['stop'] == 'max_iters'
    assert res[0][1]['forward_loss'] == 0.0
    np.testing.assert_allclose(res[0][0], alone[0], rtol=1e-4, atol=1e-6)


def test_divergence_is_reported_not_raised():
    rng = np.random.default_rng(7)
    a = rng.normal(0, 2, (60, 3)).astype(np.float32)
    cfg = NSFPConfig(fast=False, max_iters=20, lr=1e30, hidden_units=16, hidden_layers=2)
    flow, info = run_nsfp(a, a + 0.3, cfg)
    assert info['status'] == 'failed' and 'diverged' in info['reason']


@pytest.mark.parametrize('bad, msg', [
    (np.zeros((5, 3), np.float32), 'at least'),
    (np.full((100, 3), np.nan, np.float32), 'NaN'),
    (np.zeros((100, 2), np.float32), r'\(N,3\)'),
    (np.zeros((100, 3), np.int32), 'float32'),
])
def test_bad_input_raises_named_error(bad, msg):
    good = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)
    with pytest.raises(NSFPError, match=msg):
        run_nsfp(bad, good, NSFPConfig())
    with pytest.raises(NSFPError, match='pc1'):
        run_nsfp(good, bad, NSFPConfig())


def test_config_rejects_unknown_engine_and_resolves_auto():
    with pytest.raises(NSFPError, match='nn'):
        NSFPConfig(nn='octree')
    assert NSFPConfig().engine('cpu') == 'kdtree'
    assert NSFPConfig().engine('cuda') == 'brute'
    f = NSFPConfig.faithful()
    assert (f.iters, f.eff_patience, f.lr, f.min_delta, f.trunc_sq_dist) == (5000, 100, 0.008, 5e-5, 2.0)
    assert f.lr_at(4000) == 0.008
    fast = NSFPConfig()
    assert fast.lr_at(0) == pytest.approx(0.008)
    assert fast.lr_at(fast.fast_max_iters - 1) == pytest.approx(0.008 * fast.fast_lr_final)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (run on an H200 in development)')
@pytest.mark.parametrize('nn', ['brute', 'kdtree', 'dt'])
def test_cuda_matches_cpu(nn):
    rng = np.random.default_rng(8)
    pairs = []
    for n in (300, 500, 200):
        a = rng.normal(0, 3, (n, 3)).astype(np.float32)
        pairs.append((a, a + np.float32([0.3, 0, 0])))
    cfg = NSFPConfig(fit_points=256, fast_max_iters=40, hidden_units=64, nn=nn)
    cuda = run_nsfp_batch(pairs, cfg, 'cuda', [1, 2, 3])
    cpu = run_nsfp_batch(pairs, cfg, 'cpu', [1, 2, 3])
    for (fc, ic), (fp, ip) in zip(cuda, cpu):
        assert ic['status'] == 'ok' and ic['device'].startswith('cuda')
        np.testing.assert_allclose(fc, fp, atol=1e-3)
