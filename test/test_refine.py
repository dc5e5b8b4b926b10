"""Rigid-cluster refinement of teacher labels: hand-built scenes with known answers, use in training."""
from __future__ import annotations

import numpy as np
import pytest

from zeroflow_training.refine import RefineConfig, RefineError, bev_clusters, refine_labels


def _box(x0, y0, lx, ly, step=0.2, z=0.5):
    xs, ys = np.meshgrid(np.arange(x0, x0 + lx, step), np.arange(y0, y0 + ly, step), indexing='ij')
    return np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, z)], axis=1)


def _scene(rng):
    """A 30 m wall drifting 0.08 m/frame, a car moving 1 m/frame with noisy and outlier labels,
    a slow cluster (0.03 m/frame), an isolated point with a big wrong label, an all-invalid cluster."""
    parts = {
        'wall': _box(0.0, 10.0, 30.0, 0.4),
        'car': _box(5.0, 2.0, 4.4, 1.8),        # 7.6 m from the wall: its own cluster
        'slow': _box(-10.0, -10.0, 1.0, 1.0),
        'lone': np.array([[40.0, -30.0, 0.5]]),
        'blind': _box(-20.0, 5.0, 1.0, 1.0),
    }
    flows = {
        'wall': np.tile([0.08, 0.0, 0.0], (len(parts['wall']), 1)),
        'car': np.array([1.0, 0.2, 0.0]) + rng.normal(0, 0.05, (len(parts['car']), 3)),
        'slow': np.tile([0.0, 0.03, 0.0], (len(parts['slow']), 1)),
        'lone': np.array([[0.0, -2.0, 0.0]]),
        'blind': np.tile([1.0, 1.0, 0.0], (len(parts['blind']), 1)),
    }
    flows['car'][:5] = [9.0, -9.0, 3.0]   # outlier labels inside the car
    names = list(parts)
    pts = np.concatenate([parts[k] for k in names])
    flow = np.concatenate([flows[k] for k in names])
    which = np.concatenate([np.full(len(parts[k]), i) for i, k in enumerate(names)])
    valid = which != names.index('blind')
    return pts, flow, valid, which, names


def test_refinement_of_a_hand_built_scene():
    rng = np.random.default_rng(0)
    pts, flow, valid, which, names = _scene(rng)
    cfg = RefineConfig()
    out = refine_labels(pts, flow, valid, cfg)
    part = {k: which == i for i, k in enumerate(names)}
    # 30 m long: static structure, its drift removed although it is above the speed threshold
    assert np.all(out[part['wall']] == 0)
    # every car point gets the car's median flow: noise and outliers gone
    car = out[part['car']]
    assert np.all(car == car[0])
    np.testing.assert_allclose(car[0], np.median(flow[part['car']], axis=0), atol=1e-6)
    np.testing.assert_allclose(car[0], [1.0, 0.2, 0.0], atol=0.02)
    # below 0.5 m/s (0.05 m/frame at 10 Hz): static
    assert np.all(out[part['slow']] == 0)
    # a one-point cluster keeps its (median = own) label: the refinement does not invent zeros there
    np.testing.assert_allclose(out[part['lone']], [[0.0, -2.0, 0.0]])
    # no valid label in the cluster: nothing to take a median of -> zero, validity untouched
    assert np.all(out[part['blind']] == 0)
    # the thresholds are settings: a 40 m limit keeps the wall's drift, 0.2 m/s keeps the slow cluster
    loose = refine_labels(pts, flow, valid, RefineConfig(max_extent_m=40.0, min_speed_mps=0.2))
    np.testing.assert_allclose(loose[part['wall']], flow[part['wall']], atol=1e-7)
    np.testing.assert_allclose(loose[part['slow']], flow[part['slow']], atol=1e-7)
    # the speed threshold follows the frame rate: 0.03 m/frame is 0.6 m/s at 20 Hz
    fast = refine_labels(pts, flow, valid, RefineConfig(frame_rate_hz=20.0))
    np.testing.assert_allclose(fast[part['slow']], flow[part['slow']], atol=1e-7)


def test_clusters_match_a_brute_force_flood_fill():
    rng = np.random.default_rng(1)
    pts = rng.uniform(-6, 6, (300, 3))
    cell = 0.6
    got = bev_clusters(pts, cell)
    cells = np.floor(pts[:, :2] / cell).astype(int)
    # brute force: points are linked when their cells touch (Chebyshev distance <= 1)
    n = len(pts)
    label = -np.ones(n, dtype=int)
    cur = 0
    for s in range(n):
        if label[s] >= 0:
            continue
        stack, label[s] = [s], cur
        while stack:
            i = stack.pop()
            near = np.flatnonzero((np.abs(cells - cells[i]).max(axis=1) <= 1) & (label < 0))
            label[near] = cur
            stack.extend(near.tolist())
        cur += 1
    # same partition (ids may differ)
    pairs = {(a, b) for a, b in zip(got, label)}
    assert len(pairs) == len(set(got)) == len(set(label)) == cur


def test_config_and_input_errors():
    assert RefineConfig.from_dict({}) is None and RefineConfig.from_dict(None) is None
    assert RefineConfig.from_dict({'cell_m': 1}).cell_m == 1.0
    with pytest.raises(RefineError, match=r"unknown keys \['cell'\]; known: \['cell_m'"):
        RefineConfig.from_dict({'cell': 1})
    with pytest.raises(RefineError, match='max_extent_m: must be a positive number, got -1'):
        RefineConfig(max_extent_m=-1)
    with pytest.raises(RefineError, match=r'expected points \(N,3\), flow \(N,3\), valid \(N,\)'):
        refine_labels(np.zeros((4, 3)), np.zeros((3, 3)), np.ones(4, bool), RefineConfig())
    empty = np.zeros((0, 3))
    assert refine_labels(empty, empty, np.zeros(0, bool), RefineConfig()).shape == (0, 3)
    from zeroflow_training.train import TrainConfig, TrainError
    with pytest.raises(TrainError, match=r"label_refine: .*unknown keys \['speed'\]"):
        TrainConfig.from_dict({'label_refine': {'speed': 1}})
    assert TrainConfig.from_yaml('cpu_small').refine_config() == RefineConfig()
